"""xray_match.samplers"""
