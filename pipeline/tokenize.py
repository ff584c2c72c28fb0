"""Text to token ids with the model folder's fast tokenizer, truncated at max_length.

Produces flat numpy arrays (ids + per-document lengths) so a fragment's tokens travel between
Ray stages as one Arrow column, not as Python lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class TokenizedTexts:
    ids: np.ndarray  # (sum of lengths,) int32, all documents back to back
    lengths: np.ndarray  # (N,) int32 tokens per document, special tokens included
    truncated: np.ndarray  # (N,) bool, text was cut at max_length


class TextTokenizer:
    def __init__(self, model_path: str, max_length: int):
        self.backend = _load_backend(model_path)
        self.backend.no_padding()
        self.backend.enable_truncation(max_length)
        self.max_length = max_length

    def encode(self, texts: list[str]) -> TokenizedTexts:
        encodings = self.backend.encode_batch(texts)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int32, count=len(encodings))
        truncated = np.fromiter((bool(e.overflowing) for e in encodings), dtype=bool, count=len(encodings))
        ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int32, count=int(lengths.sum()))
        return TokenizedTexts(ids, lengths, truncated)


def _load_backend(model_path: str):
    """The Rust tokenizer: tokenizer.json when present, else converted by transformers."""
    from tokenizers import Tokenizer

    file = Path(model_path) / "tokenizer.json"
    if file.is_file():
        return Tokenizer.from_file(str(file))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, use_fast=True).backend_tokenizer
