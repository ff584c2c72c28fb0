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
    """Where a token-level output's vectors come from. `unit` and `also` map each token of the
    fragment to the accumulator slot it adds to (-1 = none); `also` is only for `first_last`,
    whose one-piece words feed both of their slots from one token."""

    unit: np.ndarray  # (sum of window lengths,) int64 slot each token adds to, -1 = none
    counts: np.ndarray  # (rows,) int64 units (vectors) per row
    spans: np.ndarray  # (units, 2) int32 character [start, end) of each token or word (in its word, if given)
    also: np.ndarray | None = None  # (sum of window lengths,) int64 second slot (first_last), -1 = none
    word: np.ndarray | None = None  # (units,) int32 index of the given word (pre-tokenized input only)
    missing: np.ndarray | None = None  # (units,) bool given word without a sub-token: a null vector

    @property
    def slots(self) -> int:
        """Accumulator slots: one per unit, two per word for first_last."""
        return len(self.spans) * (1 if self.also is None else 2)


def row_plan(windows: TokenWindows, window_rows: bool) -> RowPlan:
    if window_rows:  # every window is a row of its own and owns all its positions
        owned = np.stack([np.zeros_like(windows.lengths), windows.lengths], axis=1)
        return RowPlan(len(windows.lengths), np.arange(len(windows.lengths)), owned)
    return RowPlan(len(windows.n_tokens), windows.doc.astype(np.int64), windows.owned)


def token_units(windows: TokenWindows, plan: RowPlan, words: str) -> TokenUnits:
    """words: none = one unit per sub-token; first / last / mean / first_last = one unit per word,
    fed by its first, its last, every, or its first and its last sub-token.

    Words are the tokenizer's pre-tokenizer words of the text, or the given words (pre-tokenized
    input: `windows.n_words`, document rows only), each given word a unit even when it has no
    sub-token the model saw (`missing`). Only the sub-tokens a row owns count, so a word split
    across windows takes each sub-token from the window that owns it.
    """
    lengths = windows.lengths
    position = np.arange(len(windows.ids)) - np.repeat(windows.starts[:-1], lengths)
    lo, hi = (np.repeat(plan.owned[:, i], lengths) for i in (0, 1))
    emitted = np.flatnonzero((position >= lo) & (position < hi) & ~windows.special)  # text order, row by row
    row = np.repeat(plan.row_of_window, lengths)[emitted]
    offsets = windows.offsets[emitted]
    given = windows.n_words is not None and words != "none"
    if given:  # unit = the row's first unit + the given word's index
        if plan.rows != len(windows.n_words):
            raise ValueError("given words make one row per document; rows per window cannot hold them")
        counts = windows.n_words.astype(np.int64)
        first_unit = np.cumsum(counts) - counts
        unit_of = first_unit[row] + windows.word_ids[emitted]
    else:
        starts_unit = np.ones(len(emitted), dtype=bool)
        if words != "none" and len(emitted) > 1:
            word = windows.word_ids[emitted]
            starts_unit[1:] = (word[1:] != word[:-1]) | (row[1:] != row[:-1]) | (word[1:] < 0)
        unit_of = np.cumsum(starts_unit) - 1
        counts = np.bincount(row[starts_unit], minlength=plan.rows).astype(np.int64)
    units = int(counts.sum())
    # a unit's tokens are consecutive among the emitted ones: its first and last are where it changes
    changes = unit_of[1:] != unit_of[:-1]
    is_first, is_last = (np.r_[True, changes], np.r_[changes, True]) if len(emitted) else (changes, changes)
    unit = np.full(len(windows.ids), -1, dtype=np.int64)
    also = None
    if words in ("none", "mean"):
        unit[emitted] = unit_of
    elif words == "first":
        unit[emitted[is_first]] = unit_of[is_first]
    elif words == "last":
        unit[emitted[is_last]] = unit_of[is_last]
    else:  # first_last: slot 2u from the first sub-token, 2u + 1 from the last
        unit[emitted[is_first]] = 2 * unit_of[is_first]
        also = np.full(len(windows.ids), -1, dtype=np.int64)
        also[emitted[is_last]] = 2 * unit_of[is_last] + 1
    spans = np.zeros((units, 2), np.int64)
    if len(emitted):
        first = np.flatnonzero(is_first)
        spans[unit_of[first]] = np.stack([np.minimum.reduceat(offsets[:, 0], first),
                                          np.maximum.reduceat(offsets[:, 1], first)], 1)
    word_index = missing = None
    if windows.n_words is not None:
        if given:
            word_index = np.arange(units) - np.repeat(first_unit, counts)
            missing = np.ones(units, bool)
            missing[unit_of] = False
        else:
            word_index = windows.word_ids[emitted]
    return TokenUnits(unit, counts, spans.astype(np.int32), also,
                      None if word_index is None else word_index.astype(np.int32), missing)
