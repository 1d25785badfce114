"""Word vocabulary and tokenizer, built from TRAINING captions only.

A reference code base built its vocabulary from all splits, so test words got trained embeddings
and the test split leaked into the model (vsepp#29). Here the vocabulary is a pure function of one
split's captions (:func:`split_captions` reads only the split it is given; the recipes call it with
``cfg.data.train_split`` in ``Recipe.prepare``, on the driver), and a word seen only at test time maps
to ``<unk>``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and numbers; punctuation is dropped: ``"Two digits: a red one"`` ->
    ``["two", "digits", "a", "red", "one"]``."""
    return _WORD.findall(text.lower())


def sentence_key(text: str) -> str:
    """Identity of a sentence: its lower-cased words (punctuation and case do not make a new one).
    Two captions with the same key are the same sentence: neither is a negative of the other."""
    return " ".join(tokenize(text))


@dataclass
class Vocab:
    """``<pad>`` = 0 (the embedding's padding row), ``<unk>`` = 1, then words by falling count."""

    words: list[str]
    source: str = ""  # the split the vocabulary was built from, for provenance checks
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.words[:2] != [PAD, UNK]:
            raise ValueError(f"vocabulary must start with {PAD!r}, {UNK!r}; got {self.words[:2]}")
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("vocabulary has duplicate words")

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """Word ids, truncated to ``max_len``; never empty (a caption without words is ``[<unk>]``,
        so every caption has length >= 1 and the GRU and the softmaxes over words are defined)."""
        ids = [self.index.get(w, UNK_ID) for w in tokenize(text)]
        if max_len is not None:
            ids = ids[:max_len]
        return ids or [UNK_ID]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.words[i] for i in ids if i != PAD_ID)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (picklable, JSON-able) for ``DataInfo.prepared`` and checkpoints."""
        return {"words": list(self.words), "source": self.source, "counts": dict(self.counts)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Vocab":
        try:
            return cls(words=list(d["words"]), source=d.get("source", ""), counts=dict(d.get("counts", {})))
        except (KeyError, TypeError) as e:
            raise ValueError(f"prepared vocabulary is malformed (missing {e})") from None


def build_vocab(captions: Iterable[str], min_count: int = 1, source: str = "") -> Vocab:
    """Words seen at least ``min_count`` times; ties broken alphabetically so the ids are stable."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    counts = Counter(w for c in captions for w in tokenize(c))
    kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    return Vocab([PAD, UNK, *kept], source=source, counts={w: counts[w] for w in kept})


def split_captions(root: str, split: str) -> list[str]:
    """Every caption of one split, reading only the samples' ``.json`` (no image decoding)."""
    from xray_match.data.format import ShardFormatError
    from xray_match.data.reader import iter_meta

    out: list[str] = []
    for key, meta in iter_meta(root, split):
        caps = meta.get("captions") if isinstance(meta, dict) else None
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise ShardFormatError(f"{root} split {split!r} sample {key}: json.captions must be a list of strings")
        if meta.get("split", split) != split:
            raise ShardFormatError(f"{root} sample {key}: json.split is {meta.get('split')!r} inside split {split!r}")
        out.extend(caps)
    return out
