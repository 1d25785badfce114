"""Text processing shared by the word-level models (RDAN, DSPE): tokenizer and vocabulary."""

from xray_match.text.vocab import PAD, UNK, Vocab, build_vocab, split_captions, tokenize

__all__ = ["PAD", "UNK", "Vocab", "build_vocab", "split_captions", "tokenize"]
