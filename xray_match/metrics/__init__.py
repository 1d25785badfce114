"""xray_match.metrics"""
