"""xray_match.models"""
