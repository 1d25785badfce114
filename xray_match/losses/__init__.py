"""xray_match.losses"""
