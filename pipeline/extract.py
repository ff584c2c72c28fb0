"""From hidden states to output vectors: layer selection, pooling, combining, normalizing.

Pure functions over tensors (no I/O, no config objects inside the math), so each is tested
against a plain-transformers reference. Shapes: B documents, T tokens, D hidden size,
L selected layers. Pooling runs in float32 whatever the compute dtype, so bf16 models do not
lose precision when summing hundreds of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.config import LayerSpec, OutputSpec
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class ResolvedOutput:
    """An output with its layers as absolute hidden-state indices (0..num_layers)."""

    name: str
    layers: tuple[int, ...]
    pooling: str
    combine: str
    weights: tuple[float, ...] | None
    normalize: bool

    @property
    def depth(self) -> int:
        """The deepest hidden state this output reads (early exit stops there)."""
        return max(self.layers) if self.pooling != "first_last_avg" else max(max(self.layers), 1)

    def vector_shape(self, hidden: int) -> tuple[int, ...]:
        n = 1 if self.pooling == "first_last_avg" else len(self.layers)
        if self.combine == "stack":
            return (n, hidden)
        if self.combine == "concat":
            return (n * hidden,)
        return (hidden,)


def resolve_layers(spec: LayerSpec, num_layers: int) -> tuple[int, ...]:
    """Absolute hidden-state indices of a layer spec; 0 = embeddings, num_layers = last layer."""
    count = num_layers + 1
    if spec == "all":
        return tuple(range(count))
    if isinstance(spec, str):
        parts = [int(p) if p.strip() else None for p in spec.split(":")]
        chosen = tuple(range(count)[slice(*parts)])
        if not chosen:
            raise ConfigError(f"layers {spec!r} selects no layer of a model with {num_layers} layers")
        return chosen
    resolved = []
    for index in spec:
        if not -count <= index < count:
            raise ConfigError(
                f"layer {index} is beyond the model's depth: it has {num_layers} layers, so valid "
                f"indices are 0..{num_layers} (0 = embeddings) or -{count}..-1"
            )
        resolved.append(index % count)
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"layers {list(spec)} name the same layer twice")
    return tuple(resolved)


def resolve_output(spec: OutputSpec, num_layers: int) -> ResolvedOutput:
    layers = resolve_layers(spec.layers, num_layers)
    if spec.pooling == "none":
        raise ConfigError(f"outputs.{spec.name}: pooling: none (token-level vectors) is not supported yet")
    weights = tuple(spec.weights) if spec.weights is not None else None
    n = 1 if spec.pooling == "first_last_avg" else len(layers)
    if weights is not None and len(weights) != n:
        raise ConfigError(
            f"outputs.{spec.name}: weights has {len(weights)} numbers but layers {spec.layers!r} selects {n}"
        )
    return ResolvedOutput(spec.name, layers, spec.pooling, spec.combine, weights, spec.normalize)


def pool_cls(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # (B, T, D) -> (B, D): the first token
    return hidden[:, 0].float()


def pool_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # (B, T, D), (B, T) -> (B, D): mean over real tokens
    weights = mask.unsqueeze(-1).float()  # (B, T, 1)
    summed = (hidden.float() * weights).sum(dim=1)
    return summed / weights.sum(dim=1).clamp(min=1e-9)


def pool_max(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # (B, T, D), (B, T) -> (B, D): max over real tokens
    masked = hidden.float().masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
    return masked.max(dim=1).values


def pool_first_last_avg(first: torch.Tensor, last: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # (B, T, D) x2 -> (B, D): token-wise average of two layers, then masked mean
    return pool_mean((first.float() + last.float()) / 2, mask)


POOLERS = {"cls": pool_cls, "mean": pool_mean, "max": pool_max}


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


def l2_normalize(vectors: torch.Tensor) -> torch.Tensor:
    # (..., D) -> (..., D) unit length along the last axis (each layer of a stack on its own)
    return F.normalize(vectors, p=2, dim=-1)


def compute_output(hidden_states: tuple[torch.Tensor, ...], mask: torch.Tensor, out: ResolvedOutput) -> torch.Tensor:
    """One output for a micro-batch: (B, *out.vector_shape(D)) in float32, on the hidden states' device."""
    if out.pooling == "first_last_avg":
        pooled = pool_first_last_avg(hidden_states[1], hidden_states[max(out.layers)], mask).unsqueeze(1)
    else:
        pool = POOLERS[out.pooling]
        pooled = torch.stack([pool(hidden_states[i], mask) for i in out.layers], dim=1)  # (B, L, D)
    combined = combine_layers(pooled, out.combine, out.weights)
    return l2_normalize(combined) if out.normalize else combined
