"""The run configuration: pydantic models for every key of DESIGN.md, YAML loading, `--set` overrides.

Code downstream receives a validated `StrataConfig`; nothing else reads YAML or raw dicts.
Unknown keys are errors, and every validation problem becomes one `ConfigError` line that
names the key path and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

# Columns strata writes itself; an output or keep field may not reuse these names.
RESERVED_COLUMNS = frozenset({"id", "source", "row", "window", "window_span", "n_tokens", "truncated"})
_SLICE_RE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*)?$")
_COLUMN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

LayerSpec = Union[Literal["all"], list[int], str]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Strict):
    uri: str = Field(description="File, directory/prefix or glob of the corpus shards (local or s3://)")
    format: Literal["auto", "jsonl", "parquet", "text"] = Field(
        "auto", description="Shard format; auto = from the file extension"
    )
    id_field: str = Field("id", description="Field holding the document id; missing → derived from source and row")
    text_field: str = Field("text", description="Field holding the text to embed")
    keep_fields: list[str] = Field(default_factory=list, description="Input fields copied into the output rows")

    @field_validator("keep_fields")
    @classmethod
    def _keep_fields_are_columns(cls, fields: list[str]) -> list[str]:
        for name in fields:
            if name in RESERVED_COLUMNS:
                raise ValueError(f"{name!r} is a column strata writes itself; keep_fields cannot reuse it")
        if len(set(fields)) != len(fields):
            raise ValueError("keep_fields lists a field twice")
        return fields


class ModelConfig(_Strict):
    name_or_path: str = Field("default", description='"default" (packaged all-MiniLM-L6-v2) or a local model folder')
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype; auto = bfloat16 on GPU, float32 on CPU"
    )
    max_length: Union[Literal["auto"], int] = Field(
        "auto", description="Tokens per sequence; auto = the model folder's own limit"
    )

    @field_validator("max_length")
    @classmethod
    def _positive_length(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 2:
            raise ValueError("must be 'auto' or a number of tokens ≥ 2")
        return value


class OutputSpec(_Strict):
    name: str = Field(description="Parquet column name of this output")
    layers: LayerSpec = Field("all", description='all | [-1] | [0, 6, 12] | "-4:" ; 0 = embedding layer output')
    pooling: Literal["cls", "mean", "max", "first_last_avg", "none"] = Field("mean", description="Token pooling")
    combine: Literal["stack", "concat", "mean", "sum", "weighted"] = Field("stack", description="Layer combination")
    weights: list[float] | None = Field(None, description="Per-layer weights for combine: weighted")
    normalize: bool = Field(False, description="L2-normalize after pooling/combining (per token when pooling: none)")
    words: Literal["none", "first", "mean"] = Field(
        "none", description="pooling none only: none = sub-token vectors; first / mean = word vectors"
    )

    @field_validator("name")
    @classmethod
    def _column_name(cls, name: str) -> str:
        if not _COLUMN_RE.match(name):
            raise ValueError(f"{name!r} is not a valid column name (letters, digits, _; not starting with a digit)")
        if name in RESERVED_COLUMNS:
            raise ValueError(f"{name!r} is a column strata writes itself; choose another output name")
        return name

    @field_validator("layers")
    @classmethod
    def _layer_syntax(cls, layers: LayerSpec) -> LayerSpec:
        if isinstance(layers, list):
            if not layers:
                raise ValueError("the layer list is empty; give at least one layer index, or 'all'")
            if len(set(layers)) != len(layers):
                raise ValueError(f"the layer list {layers} names a layer twice")
        elif layers != "all" and not _SLICE_RE.match(layers):
            raise ValueError(f"{layers!r} is not 'all', a list of indices, or a slice such as '-4:' or '2:8'")
        return layers

    @model_validator(mode="after")
    def _combine_options(self) -> "OutputSpec":
        if self.combine == "weighted" and not self.weights:
            raise ValueError("combine: weighted needs weights: [one number per selected layer]")
        if self.combine != "weighted" and self.weights is not None:
            raise ValueError("weights are only used with combine: weighted")
        if isinstance(self.layers, list) and self.weights is not None and self.pooling != "first_last_avg" \
                and len(self.weights) != len(self.layers):
            raise ValueError(f"weights has {len(self.weights)} numbers but layers selects {len(self.layers)} layers")
        if self.words != "none" and self.pooling != "none":
            raise ValueError(f"words: {self.words} makes word vectors, which needs pooling: none (token-level)")
        return self


def _default_outputs() -> list[OutputSpec]:
    return [OutputSpec(name="embedding", layers=[-1], pooling="mean", combine="concat")]


class LongTextConfig(_Strict):
    strategy: Literal["truncate", "sliding_window"] = Field("truncate", description="What to do past max_length")
    stride: int = Field(256, ge=1, description="Window overlap in tokens for sliding_window")
    aggregate: Literal["mean", "none"] = Field("mean", description="Merge windows (mean) or one row per window (none)")

    @property
    def window_stride(self) -> int | None:
        """The overlap of sliding windows; None when documents are truncated."""
        return self.stride if self.strategy == "sliding_window" else None

    @property
    def window_rows(self) -> bool:
        """One output row per window instead of per document."""
        return self.strategy == "sliding_window" and self.aggregate == "none"


class BatchingConfig(_Strict):
    token_budget: int = Field(16384, ge=2, description="Padded tokens per forward micro-batch")
    fragment_docs: int = Field(4096, ge=1, description="Documents (rows) per work unit")


class OutputConfig(_Strict):
    uri: str = Field(description="Output location (local path or s3://)")
    precision: Literal["float16", "float32"] = Field("float16", description="Stored vector precision")
    partition_by: str = Field("source", description="source | a keep_field | none")


class ComputeConfig(_Strict):
    replicas: Union[Literal["auto"], int] = Field("auto", description="Model replicas; auto = one per GPU, 1 on CPU")
    gpus_per_replica: float = Field(1, ge=0, description="GPUs per replica; 0 on CPU-only clusters (auto-detected)")
    max_replicas: Optional[int] = Field(None, ge=1, description="Autoscaling: grow the replica pool from `replicas` up "
                                        "to this many as the cluster adds GPU nodes; null = a fixed pool")
    tokenizers: Union[Literal["auto"], int] = Field("auto", description="Most tokenizer actors (CPU); auto = 1 beside "
                                                    "a CPU replica, else the cluster's spare CPUs")
    object_store_memory: Optional[ByteSize] = Field(None, description="Object store bytes the run's data in flight may "
                                                    "take, e.g. 8GiB; null = Ray Data's default share")

    @field_validator("tokenizers")
    @classmethod
    def _positive_tokenizers(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be 'auto' or a number ≥ 1")
        return value

    @model_validator(mode="after")
    def _max_above_min(self) -> "ComputeConfig":
        if self.max_replicas is not None and isinstance(self.replicas, int) and self.max_replicas < self.replicas:
            raise ValueError(f"compute.max_replicas ({self.max_replicas}) is below compute.replicas ({self.replicas})")
        return self

    @field_validator("replicas")
    @classmethod
    def _positive_replicas(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be 'auto' or a number ≥ 1")
        return value


class StorageConfig(_Strict):
    """How to reach object storage (every URI of the config: input, output, model folder).

    Credentials come from the standard AWS chain (environment, profiles, instance roles), never
    from here, so they cannot leak into the manifest or logs.
    """

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph, R2, ...); else AWS_ENDPOINT_URL or AWS")
    region: str | None = Field(None, description="Region; else the AWS chain's")
    profile: str | None = Field(None, description="AWS profile to use")
    anonymous: bool = Field(False, description="Unsigned requests, for public buckets")
    retries: int = Field(5, ge=0, le=20, description="Attempts for throttling, 5xx and dropped connections")
    connect_timeout: float = Field(5, gt=0, description="Seconds to wait for a connection")
    options: dict[str, Any] = Field(default_factory=dict, description="Extra fsspec storage_options, merged in")


class RunConfig(_Strict):
    max_error_rate: float = Field(0.01, ge=0, le=1, description="Share of docs that may be quarantined")
    mode: Literal["once", "incremental"] = Field(
        "once", description="once = the output embeds the input once (version 1; a rerun resumes it and refuses a "
        "changed input); incremental = each run publishes a new version, embedding only what changed")


class StrataConfig(_Strict):
    input: InputConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    outputs: list[OutputSpec] = Field(default_factory=_default_outputs, min_length=1)
    long_text: LongTextConfig = Field(default_factory=LongTextConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    output: OutputConfig
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "StrataConfig":
        names = [o.name for o in self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"outputs: two outputs share a name ({names}); names become column names")
        columns = names + [f"{o.name}_offsets" for o in self.outputs if o.pooling == "none"]
        clash = set(columns) & set(self.input.keep_fields) or {c for c in columns if columns.count(c) > 1}
        if clash:
            raise ValueError(f"outputs: column {sorted(clash)[0]!r} would be written twice (an output, its "
                             "_offsets column or a keep_field); rename the output")
        if self.long_text.aggregate == "none" and self.long_text.strategy == "truncate":
            raise ValueError("long_text.aggregate: none (one row per window) needs strategy: sliding_window")
        part = self.output.partition_by
        if part not in ("source", "none") and part not in self.input.keep_fields:
            raise ValueError(f"output.partition_by: {part!r} must be 'source', 'none' or one of input.keep_fields")
        return self

    def identity(self) -> dict:
        """Every setting that shapes the stored rows and vectors, plus `fragment_docs`, which
        decides the fragments themselves (not replicas, token_budget or output.uri)."""
        relevant = self.model_dump(include={"input", "model", "outputs", "long_text", "output"})
        relevant["output"].pop("uri")
        if self.long_text.window_stride is None:  # stride and aggregate only matter for windows
            relevant["long_text"] = {"strategy": "truncate"}
        relevant["batching"] = {"fragment_docs": self.batching.fragment_docs}
        return relevant

    def fingerprint(self) -> str:
        return fingerprint_of(self.identity())


def fingerprint_of(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def identity_changes(before: dict, after: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, with both values: ["outputs.0.pooling: 'mean' → 'cls'"]."""
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        before, after = dict(enumerate(before)), dict(enumerate(after))
    if not (isinstance(before, dict) and isinstance(after, dict)):
        return [] if before == after else [f"{prefix.rstrip('.')}: {before!r} → {after!r}"]
    changes = []
    for key in sorted(set(before) | set(after), key=str):
        changes += identity_changes(before.get(key), after.get(key), f"{prefix}{key}.")
    return changes


def load_config(path: str | Path, overrides: list[str] | None = None) -> StrataConfig:
    """Read a YAML config, apply `key.path=value` overrides, validate."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (input, model, outputs, ...)")
    for item in overrides or []:
        apply_override(raw, item)
    return parse_config(raw, origin=str(path))


def parse_config(raw: dict, origin: str = "config") -> StrataConfig:
    try:
        return StrataConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: " + "; ".join(_describe(err) for err in exc.errors())) from None


def _describe(err: dict) -> str:
    where = ".".join(str(part) for part in err["loc"] if not str(part).startswith("function-after"))
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return f"unknown key {where!r} (check the spelling; see the config reference in README.md)"
    if kind == "missing":
        return f"missing required key {where!r}"
    msg = msg.removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (numbers, lists)."""
    key, sep, value_text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. --set output.uri=./out/run2")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError:
        value = value_text
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {part!r} is not an index of the {len(node)}-item list")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:depth])} is a value, not a section")


def redacted(config: StrataConfig) -> dict:
    """The config as plain data with `storage.options` values masked: what strata prints or stores."""
    data = config.model_dump(mode="json")
    data["storage"]["options"] = {key: "***" for key in data["storage"]["options"]}
    return data


def to_yaml(config: StrataConfig) -> str:
    return yaml.safe_dump(redacted(config), sort_keys=False)
