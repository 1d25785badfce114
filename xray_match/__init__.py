"""xray_match."""
