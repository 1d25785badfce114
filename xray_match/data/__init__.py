"""Shard format, writers, the embedded digit-scenes data set and streaming readers."""

from xray_match.data.format import FORMAT_VERSION, Manifest, ShardFormatError, read_manifest
from xray_match.data.reader import decode_sample, make_loader, shard_urls

__all__ = ["FORMAT_VERSION", "Manifest", "ShardFormatError", "read_manifest", "decode_sample", "make_loader", "shard_urls"]
