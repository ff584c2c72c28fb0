"""What a run computes, resolved against its model, as plain data: each output's hidden-state
indices, pooling and vector shape, and the settings a model replica runs with.

No torch here: the driver and the CPU workers (read, tokenize, write) carry these objects
without importing torch, which keeps their start-up fast and their memory small.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import LayerSpec, OutputSpec
from pipeline.errors import ConfigError
from pipeline.model import ModelInfo


@dataclass(frozen=True)
class ResolvedOutput:
    """An output with its layers as absolute hidden-state indices (0..num_layers)."""

    name: str
    layers: tuple[int, ...]
    pooling: str
    combine: str
    weights: tuple[float, ...] | None
    normalize: bool
    words: str = "none"  # token-level only: none (sub-tokens) | first | last | mean | first_last (word vectors)

    @property
    def token_level(self) -> bool:
        return self.pooling == "none"

    @property
    def depth(self) -> int:
        """The deepest hidden state this output reads (early exit stops there)."""
        return max(self.layers) if self.pooling != "first_last_avg" else max(max(self.layers), 1)

    @property
    def pooled_layers(self) -> int:
        """L: layers left after pooling (first_last_avg folds two into one)."""
        return 1 if self.pooling == "first_last_avg" else len(self.layers)

    @property
    def pairs(self) -> bool:
        """`words: first_last`: each word's vector is its first and last sub-token's, concatenated."""
        return self.words == "first_last"

    def vector_shape(self, hidden: int) -> tuple[int, ...]:
        """Shape of one vector (per document, window, token or word); `first_last` doubles the last axis."""
        width = hidden * (2 if self.pairs else 1)
        if self.combine == "stack":
            return (self.pooled_layers, width)
        if self.combine == "concat":
            return (self.pooled_layers * width,)
        return (width,)


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
    weights = tuple(spec.weights) if spec.weights is not None else None
    resolved = ResolvedOutput(spec.name, layers, spec.pooling, spec.combine, weights, spec.normalize, spec.words)
    if weights is not None and len(weights) != resolved.pooled_layers:
        what = "first_last_avg pools into 1" if spec.pooling == "first_last_avg" else f"layers {spec.layers!r} selects {len(layers)}"
        raise ConfigError(f"outputs.{spec.name}: weights has {len(weights)} numbers but {what}")
    return resolved


@dataclass(frozen=True)
class DeviceOptions:
    """Speed-ups that only a GPU can decide, each off by default until `strata bench --try` has
    measured it on one (docs/BENCHMARKS.md). Not config keys: a benchmark's switches."""

    pass_overhead: int | None = None  # tokens the packer counts per forward pass; None = the device's default
    # transformers' attn_implementation; None = what transformers picks for the architecture (sdpa where it
    # has it, else eager); flash_attention_2 unpads inside attention
    attention: str | None = None
    compile: str | None = None  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune


@dataclass(frozen=True)
class Simulation:
    """A simulated accelerator in place of the encoder (`strata bench --device sim:TOKENS_PER_S`,
    `pipeline/simulated.py`): never a run option, its vectors are zeros. `stats_file` is where
    the replica reports the simulated device's clock (JSON, rewritten after every read-back);
    `concurrent_fragments`: fragments a replica works on at once (1 shows what overlap gains)."""

    tokens_per_s: float
    stats_file: str | None = None
    concurrent_fragments: int = 2

    @classmethod
    def parse(cls, device: str, stats_file: str | None = None) -> "Simulation":
        """`sim:TOKENS_PER_S` (e.g. `sim:50000`, `sim:4e6`); ValueError for anything else."""
        kind, _, rate = device.partition(":")
        try:
            tokens_per_s = float(rate)
        except ValueError:
            tokens_per_s = 0.0
        if kind != "sim" or not tokens_per_s > 0 or tokens_per_s == float("inf"):
            raise ValueError(f"a simulated device is sim:TOKENS_PER_S with a rate above 0 (e.g. sim:50000), not {device!r}")
        return cls(tokens_per_s, stats_file)


@dataclass(frozen=True)
class EmbedSettings:
    model: ModelInfo
    outputs: tuple[ResolvedOutput, ...]
    dtype: str  # auto | bfloat16 | float16 | float32
    token_budget: int
    precision: str  # float16 | float32
    cpu_threads: int | None = None  # torch threads on a CPU replica; None = torch's default
    window_rows: bool = False  # one output row per window (long_text.aggregate: none)
    device_options: DeviceOptions = field(default_factory=DeviceOptions)
    simulation: Simulation | None = None  # benchmarks only: a simulated device instead of the model

    @property
    def token_details(self) -> bool:
        """Token-level outputs need special-token masks, word ids and character offsets."""
        return any(out.token_level for out in self.outputs)
