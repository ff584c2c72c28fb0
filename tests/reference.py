"""The reference every extraction test compares against: plain transformers
(`output_hidden_states=True`, fp32, one text at a time) and numpy written from the definitions."""

from __future__ import annotations

import numpy as np
import torch


class Reference:
    def __init__(self, model_path: str):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModel.from_pretrained(model_path, dtype=torch.float32).eval()

    def hidden(self, input_ids: list[int]) -> list[np.ndarray]:
        """All hidden states of one sequence: num_layers + 1 arrays of (T, D)."""
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([input_ids]), output_hidden_states=True)
        return [h[0].numpy() for h in out.hidden_states]

    def hidden_of(self, encoding: dict) -> list[np.ndarray]:
        """All hidden states of one sequence as `AutoTokenizer` encoded it, every input the
        tokenizer makes for the model (token_type_ids where it has them): num_layers + 1 of (T, D)."""
        inputs = {name: torch.tensor([encoding[name]]) for name in self.tokenizer.model_input_names
                  if name in encoding}
        with torch.no_grad():
            out = self.model(**inputs, output_hidden_states=True)
        return [h[0].numpy() for h in out.hidden_states]

    def encode(self, text: str, max_length: int) -> list[int]:
        return self.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]


def pool(hidden: list[np.ndarray], layers: list[int], pooling: str) -> list[np.ndarray]:
    """Per layer: (D,) for a pooling, (n, D) of the non-special tokens for pooling none."""
    if pooling == "cls":
        return [hidden[i][0] for i in layers]
    if pooling == "mean":
        return [hidden[i].mean(0) for i in layers]
    if pooling == "max":
        return [hidden[i].max(0) for i in layers]
    if pooling == "first_last_avg":
        return [((hidden[1] + hidden[max(layers)]) / 2).mean(0)]
    return [hidden[i][1:-1] for i in layers]  # none: drop [CLS] and [SEP]


def combine(pooled: list[np.ndarray], how: str, weights=None, normalize=False) -> np.ndarray:
    stacked = np.stack(pooled, axis=-2)  # (..., L, D)
    if how == "stack":
        result = stacked
    elif how == "concat":
        result = np.concatenate(pooled, axis=-1)
    elif how == "mean":
        result = stacked.mean(-2)
    elif how == "sum":
        result = stacked.sum(-2)
    else:
        result = (stacked * np.asarray(weights, np.float32)[:, None]).sum(-2)
    return result / np.linalg.norm(result, axis=-1, keepdims=True) if normalize else result
