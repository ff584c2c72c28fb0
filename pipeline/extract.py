"""From hidden states to output vectors: layer selection, pooling, combining, normalizing.

Every output fills an `Accumulator` of *units*: a document (pooled outputs), a window
(`aggregate: none`), a token or a word (`pooling: none`). A micro-batch of windows adds what each
window contributes to its units: pooled sums or maxima over the positions the window owns, or
per-token vectors. Once a fragment is done, `result()` averages, combines layers and
normalizes, in that order, so windows and words are merged before the combine and the L2 norm.

Pure tensor code (no I/O), tested against a plain-transformers reference. Shapes: B windows,
T positions, D hidden size, L layers. Everything after the encoder runs in float32 whatever the
compute dtype, so bf16 models do not lose precision when summing hundreds of tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.spec import ResolvedOutput


def _read_layers(hidden_states: tuple[torch.Tensor, ...], out: ResolvedOutput) -> list[torch.Tensor]:
    # the L per-token (B, T, D) tensors this output pools, in float32
    if out.pooling == "first_last_avg":
        return [(hidden_states[1].float() + hidden_states[max(out.layers)].float()) / 2]
    return [hidden_states[i].float() for i in out.layers]


def pool_windows(hidden_states: tuple[torch.Tensor, ...], owned: torch.Tensor, out: ResolvedOutput):
    """Pool each window over the tokens it owns: (values (B, L, D), weights (B,)).

    owned: (B, T) bool. For cls/mean/first_last_avg the values are weight-scaled sums
    (a window's contribution to its document's token-weighted mean), for max the maxima.
    """
    weights = owned.sum(dim=1).float()  # (B,) owned tokens per window
    mask = owned.unsqueeze(-1)  # (B, T, 1)
    if out.pooling == "cls":
        values = torch.stack([hidden_states[i][:, 0].float() for i in out.layers], dim=1) * weights.view(-1, 1, 1)
    elif out.pooling == "max":
        layers = _read_layers(hidden_states, out)
        values = torch.stack([h.masked_fill(~mask, float("-inf")).amax(dim=1) for h in layers], dim=1)
    else:  # mean, first_last_avg
        values = torch.stack([(h * mask).sum(dim=1) for h in _read_layers(hidden_states, out)], dim=1)
    return values, weights


def token_vectors(hidden_states: tuple[torch.Tensor, ...], emit: torch.Tensor, out: ResolvedOutput) -> torch.Tensor:
    """The chosen layers at the emitted positions: emit (n,) int64 flat positions b * T + t (a
    position may repeat) -> (n, L, D). An index, not a boolean mask: a mask's result size depends on its
    values, which makes a GPU stop and tell the host."""
    return torch.stack([hidden_states[i].flatten(0, 1).index_select(0, emit).float() for i in out.layers], dim=1)


class Accumulator:
    """Per-unit running results of one output (unit = document, window, token or word).

    Sums (with weights) for every pooling but max, maxima for max; units are filled from any
    number of micro-batches in any order, so a document's windows may be far apart. For
    `words: first_last` there are two slots per word, 2w (its first sub-token) and 2w + 1 (its
    last), joined in `result()`. A unit nothing was added to comes out as zeros.
    """

    def __init__(self, units: int, out: ResolvedOutput, hidden: int, device: torch.device):
        self.out = out
        self.is_max = out.pooling == "max"
        fill = float("-inf") if self.is_max else 0.0
        self.values = torch.full((units, out.pooled_layers, hidden), fill, dtype=torch.float32, device=device)
        self.weights = torch.zeros(units, dtype=torch.float32, device=device)

    def add(self, index: torch.Tensor, values: torch.Tensor, weights: torch.Tensor) -> None:
        # index (n,) int64 units, values (n, L, D), weights (n,)
        if self.is_max:
            self.values.scatter_reduce_(0, index.view(-1, 1, 1).expand_as(values), values, "amax")
        else:
            self.values.index_add_(0, index, values)
        self.weights.index_add_(0, index, weights)

    def result(self) -> torch.Tensor:
        """(units, *vector_shape) float32: averaged, combined across layers, (paired,) normalized."""
        values = self.values if self.is_max else self.values / self.weights.clamp(min=1e-9).view(-1, 1, 1)
        combined = combine_layers(values, self.out.combine, self.out.weights)
        if self.out.pairs:
            combined = join_pairs(combined)
        return l2_normalize(combined) if self.out.normalize else combined


def combine_layers(pooled: torch.Tensor, how: str, weights: tuple[float, ...] | None = None) -> torch.Tensor:
    # (B, L, D) -> (B, L, D) stack | (B, L*D) concat | (B, D) mean, sum, weighted
    if how == "stack":
        return pooled
    if how == "concat":
        return pooled.flatten(start_dim=1)
    if how == "mean":
        return pooled.mean(dim=1)
    if how == "sum":
        return pooled.sum(dim=1)
    if how == "weighted":
        w = torch.tensor(weights, dtype=pooled.dtype, device=pooled.device)  # (L,)
        return (pooled * w.view(1, -1, 1)).sum(dim=1)
    raise ValueError(f"unknown combine {how!r}")


def join_pairs(vectors: torch.Tensor) -> torch.Tensor:
    """(2U, ..., E) -> (U, ..., 2E): slot 2u and slot 2u + 1 concatenated along the last axis
    (flair's `subtoken_pooling="first_last"`: torch.cat([first, last], dim=-1))."""
    return torch.cat([vectors[0::2], vectors[1::2]], dim=-1)


def l2_normalize(vectors: torch.Tensor) -> torch.Tensor:
    # (..., D) -> (..., D) unit length along the last axis (each layer of a stack on its own)
    return F.normalize(vectors, p=2, dim=-1)
