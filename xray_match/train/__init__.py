"""xray_match.train"""
