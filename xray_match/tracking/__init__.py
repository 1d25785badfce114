"""xray_match.tracking"""
