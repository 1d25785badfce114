"""xray_match.tune"""
