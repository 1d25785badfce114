"""Shared image and text encoders."""
