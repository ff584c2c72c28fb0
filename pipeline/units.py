"""Which output row and unit each window and token feeds: pure index arithmetic over a
fragment's `TokenWindows`, done on the host before the forward passes.

Rows are documents, or windows with `aggregate: none`. A pooled output has one unit per row; a
token-level output has one unit per emitted token (the non-special tokens a row owns) or, for
word vectors, per word, numbered row by row in text order so a row's units are contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.tokenize import TokenWindows


@dataclass(frozen=True)
class RowPlan:
    rows: int
    row_of_window: np.ndarray  # (W,) int64 output row each window contributes to
    owned: np.ndarray  # (W, 2) [lo, hi) window positions that count for that row


@dataclass(frozen=True)
class TokenUnits:
    unit: np.ndarray  # (sum of window lengths,) int64 unit each token adds to, -1 = none
    counts: np.ndarray  # (rows,) int64 units per row
    spans: np.ndarray  # (units, 2) int32 character [start, end) of each token or word


def row_plan(windows: TokenWindows, window_rows: bool) -> RowPlan:
    if window_rows:  # every window is a row of its own and owns all its positions
        owned = np.stack([np.zeros_like(windows.lengths), windows.lengths], axis=1)
        return RowPlan(len(windows.lengths), np.arange(len(windows.lengths)), owned)
    return RowPlan(len(windows.n_tokens), windows.doc.astype(np.int64), windows.owned)


def token_units(windows: TokenWindows, plan: RowPlan, words: str) -> TokenUnits:
    """words: none = one unit per sub-token; first / mean = one unit per word (its first
    sub-token is the unit's vector, or all its sub-tokens feed it)."""
    lengths = windows.lengths
    position = np.arange(len(windows.ids)) - np.repeat(windows.starts[:-1], lengths)
    lo, hi = (np.repeat(plan.owned[:, i], lengths) for i in (0, 1))
    emitted = np.flatnonzero((position >= lo) & (position < hi) & ~windows.special)
    row = np.repeat(plan.row_of_window, lengths)[emitted]
    starts_unit = np.ones(len(emitted), dtype=bool)
    if words != "none" and len(emitted) > 1:
        word = windows.word_ids[emitted]
        starts_unit[1:] = (word[1:] != word[:-1]) | (row[1:] != row[:-1]) | (word[1:] < 0)
    unit_of_emitted = np.cumsum(starts_unit) - 1
    unit = np.full(len(windows.ids), -1, dtype=np.int64)
    if words == "first":
        unit[emitted[starts_unit]] = unit_of_emitted[starts_unit]
    else:
        unit[emitted] = unit_of_emitted
    first = np.flatnonzero(starts_unit)
    offsets = windows.offsets[emitted]
    if len(first):
        spans = np.stack([np.minimum.reduceat(offsets[:, 0], first), np.maximum.reduceat(offsets[:, 1], first)], 1)
    else:
        spans = np.zeros((0, 2), np.int32)
    counts = np.bincount(row[starts_unit], minlength=plan.rows).astype(np.int64)
    return TokenUnits(unit, counts, spans.astype(np.int32))
