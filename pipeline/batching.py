"""Length-sorted, token-budget micro-batches: pure index arithmetic, no tensors.

Windows of a fragment are sorted longest first and cut into runs whose padded size
(count × longest length) stays within the token budget. Where a run ends is a trade-off: every
window added pads up to the run's longest, every extra run costs one more forward pass. Each
run ends where it does the most real tokens per unit of cost, the cost of a run being its padded
tokens plus a fixed per-pass overhead (counted in tokens). A small overhead (a CPU, where a pass
costs about its tokens) gives short runs and little padding even in small fragments; an
overhead as large as the budget fills every run to the budget (what keeps a GPU busy).
"""

from __future__ import annotations

import numpy as np

# Per-pass overhead in tokens, measured with `strata bench`-style runs of the stage on CPU:
# 500-document fragments of docs-50k, MiniLM, max_length 256: no overhead (runs of equal length
# only) 3.8-4.3 k tokens/s, 64 → 5.2 k, 256 → 5.2 k, 1024 → 4.8-5.1 k, budget-filling runs 4.4-4.5 k.
CPU_PASS_OVERHEAD_TOKENS = 64


def pass_overhead_tokens(device_type: str, token_budget: int) -> int:
    """The per-pass overhead the packer assumes on a device. On a GPU, runs fill the budget until
    `strata bench` measures a better value there."""
    return CPU_PASS_OVERHEAD_TOKENS if device_type == "cpu" else token_budget


def pack_micro_batches(lengths: np.ndarray, token_budget: int, overhead_tokens: int | None = None,
                       equal_lengths: bool = False) -> list[np.ndarray]:
    """Window indices per micro-batch; each batch's count × max length ≤ budget (≥ 1 window).

    overhead_tokens: the cost of one forward pass beyond its tokens; None = the budget (full runs).
    equal_lengths: every micro-batch holds windows of one length (no padding at all), for models
    whose vectors change with padding.
    """
    overhead = token_budget if overhead_tokens is None else overhead_tokens
    order = np.argsort(-np.asarray(lengths), kind="stable")
    sorted_lengths = np.asarray(lengths, np.int64)[order]
    batches, start = [], 0
    while start < len(order):
        longest = max(int(sorted_lengths[start]), 1)
        most = max(1, min(token_budget // longest, len(order) - start))
        if equal_lengths:
            most = min(most, int(np.searchsorted(-sorted_lengths, -longest, side="right")) - start)
        real = np.cumsum(sorted_lengths[start : start + most])  # real tokens of runs of 1..most windows
        cost = np.arange(1, most + 1) * longest + overhead
        efficiency = real / cost
        count = most - int(np.argmax(efficiency[::-1]))  # the last of equally good ends: fewer passes
        batches.append(order[start : start + count])
        start += count
    return batches


def padded_tokens(lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    """Tokens the model processes for these batches, padding included."""
    return sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
