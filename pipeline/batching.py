"""Length-sorted, token-budget micro-batches: pure index arithmetic, no tensors.

Documents of a fragment are sorted longest first and cut into runs whose padded size
(count × longest length) stays within the token budget, so neighbours have near-equal length
and padding is small while every forward pass is about the same size.
"""

from __future__ import annotations

import numpy as np


def pack_micro_batches(lengths: np.ndarray, token_budget: int) -> list[np.ndarray]:
    """Document indices per micro-batch; each batch's count × max length ≤ budget (≥ 1 doc)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = int(lengths[order[start]])
        count = max(1, token_budget // max(longest, 1))
        batches.append(order[start : start + count])
        start += count
    return batches


def padded_tokens(lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    """Tokens the model processes for these batches, padding included."""
    return sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
