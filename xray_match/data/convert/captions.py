"""Captions as the converters keep them: whitespace normalized, empty ones a problem, exactly
``captions_per_image`` of them per image."""

from __future__ import annotations

from typing import Any

from xray_match.data.convert.plan import ConvertOptions, Problems


def normalize_caption(text: str) -> str:
    """Whitespace runs (COCO captions hold stray newlines and double spaces) become one space."""
    return " ".join(str(text).split())


def take_captions(
    captions: list[str], opts: ConvertOptions, problems: Problems, split: str, ident: Any, stats: dict[str, int]
) -> list[str] | None:
    """The first ``opts.captions_per_image`` non-empty captions, or None (and a problem) if too few.

    COCO has a few images with 6 or 7 captions; retrieval protocols (Karpathy, SCAN) use 5, so the
    extras are dropped and counted in ``stats["captions_dropped"]`` (recorded in the manifest)."""
    caps = [normalize_caption(c) for c in captions]
    empty = sum(1 for c in caps if not c)
    caps = [c for c in caps if c]
    if empty:
        problems.add(split, "empty_caption", ident, f"{empty} empty caption{'s' if empty > 1 else ''}")
        return None
    n = opts.captions_per_image
    if n == 0:
        if not caps:
            problems.add(split, "too_few_captions", ident, "0 captions")
            return None
        return caps
    if len(caps) < n:
        problems.add(split, "too_few_captions", ident, f"{len(caps)} captions, need {n}")
        return None
    if len(caps) > n:
        stats["captions_dropped"] = stats.get("captions_dropped", 0) + len(caps) - n
    return caps[:n]
