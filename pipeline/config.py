"""The run configuration: pydantic models for every key of DESIGN.md, YAML loading, `--set` overrides.

Code downstream receives a validated `StrataConfig`; nothing else reads YAML or raw dicts.
Unknown keys are errors, and every validation problem becomes one `ConfigError` line that
names the key path and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from yaml.constructor import ConstructorError
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

# Columns strata writes itself; an output or keep field may not reuse these names.
RESERVED_COLUMNS = frozenset({"id", "source", "row", "window", "window_span", "n_tokens", "truncated"})
_SLICE_RE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*)?$")
_COLUMN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

LayerSpec = Union[Literal["all"], list[int], str]

# What a config file or a `--set` value may hold: far beyond any real config (a few KB, a few
# levels, a few hundred values), and small enough that checking it, and all that follows, is instant.
MAX_CONFIG_BYTES = 1_000_000
MAX_DEPTH = 32
MAX_VALUES = 10_000  # counted with YAML aliases expanded
_INT_LIMIT = 2**63  # counts and sizes go to Arrow, Ray and the OS as 64-bit integers
_OPTION_SCALARS = (str, int, float, bool, type(None))


def _quote(text: str, limit: int = 60) -> str:
    """User text for a one-line message: escaped (no raw newlines) and cut short."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _scalar_problem(value: Any) -> str | None:
    """What is wrong with a value that passes its type but breaks the code it reaches: a NUL
    in a path (os calls raise), a count past 64 bits (Arrow overflows), NaN or infinity."""
    if isinstance(value, str) and "\x00" in value:
        return f"{_quote(value)} contains a NUL character"
    if isinstance(value, int) and not -_INT_LIMIT <= value < _INT_LIMIT:
        return f"a {value.bit_length()}-bit number is out of range (at most 2**63 - 1)"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number"
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*")
    @classmethod
    def _usable_values(cls, value: Any) -> Any:
        for item in value if isinstance(value, list) else [value]:
            problem = _scalar_problem(item)
            if problem:
                raise ValueError(problem)
        return value


DEFAULT_MAX_LINE_BYTES = 64 * 1024 * 1024


class InputConfig(_Strict):
    uri: str = Field(description="File, directory/prefix or glob of the corpus shards (local or s3://)")
    format: Literal["auto", "jsonl", "parquet", "text"] = Field(
        "auto", description="Shard format; auto = from the file extension"
    )
    id_field: str = Field("id", description="Field holding the document id; missing → derived from source and row")
    text_field: str = Field("text", description="Field holding the text to embed")
    words_field: Optional[str] = Field(None, description="Field holding a list of words per document (pre-tokenized "
                                       "input: CoNLL, spaCy, a Parquet list<string>); embedded instead of text_field, "
                                       "one word vector per given word")
    keep_fields: list[str] = Field(default_factory=list, description="Input fields copied into the output rows")
    max_line_bytes: ByteSize = Field(
        DEFAULT_MAX_LINE_BYTES, gt=0, description="Longest line of a JSONL or text shard that is read (bytes, or "
        "'64MiB'); a longer line is quarantined with its length, without reading it into memory")

    @property
    def document_field(self) -> str:
        """The field each document is read from: words_field when set, else text_field."""
        return self.text_field if self.words_field is None else self.words_field

    @field_validator("keep_fields")
    @classmethod
    def _keep_fields_are_columns(cls, fields: list[str]) -> list[str]:
        for name in fields:
            if name in RESERVED_COLUMNS:
                raise ValueError(f"{name!r} is a column strata writes itself; keep_fields cannot reuse it")
        if len(set(fields)) != len(fields):
            raise ValueError("keep_fields lists a field twice")
        return fields

    @model_validator(mode="after")
    def _text_is_not_kept(self) -> "InputConfig":
        # the text (or the words) travels in a column of its own until it is tokenized, and is not
        # stored: `strata search` reads texts back from the input. Given words may be kept.
        text_field = self.text_field if self.words_field is None else None
        for name in {"text", text_field} & set(self.keep_fields):
            raise ValueError(f"keep_fields: {name!r} " + ("is the text field; texts are not copied into the output "
                             "(strata search reads them back from the input)" if name == text_field else
                             "is the name of strata's own text column while texts are read; rename the field"))
        return self


class ModelConfig(_Strict):
    name_or_path: str = Field("default", description='"default" (packaged all-MiniLM-L6-v2) or a local model folder')
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype; auto = bfloat16 on GPU, float32 on CPU"
    )
    max_length: Union[Literal["auto"], int] = Field(
        "auto", description="Tokens per sequence; auto = the model folder's own limit"
    )
    trust_remote_code: bool = Field(
        False, description="Run the model folder's own Python (config.json auto_map) on every node, as "
        "transformers' trust_remote_code does; off: such a folder is refused"
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
    words: Literal["none", "first", "mean", "last", "first_last"] = Field(
        "none", description="pooling none only: none = sub-token vectors; first / last / mean / first_last = word "
        "vectors from the word's first, last, every, or first and last (concatenated) sub-tokens"
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

    @field_validator("options")
    @classmethod
    def _flat_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        # fsspec options are scalars, plus one level of mapping for client kwargs (s3fs's
        # s3_additional_kwargs, config_kwargs); deeper data is a mistake, and would be copied
        # by model_dump and hashed into fsspec's cache key
        for key, value in options.items():
            for name, item in value.items() if isinstance(value, dict) else [(None, value)]:
                where = _quote(key if name is None else f"{key}.{name}")
                if not isinstance(item, _OPTION_SCALARS):
                    raise ValueError(f"{where} is a {type(item).__name__}; an option is a string, number, boolean "
                                     "or null, or one mapping of those (e.g. s3_additional_kwargs: "
                                     "{ServerSideEncryption: AES256})")
                problem = _scalar_problem(item)
                if problem:
                    raise ValueError(f"{where}: {problem}")
        return options


class RunConfig(_Strict):
    max_error_rate: float = Field(0.01, ge=0, le=1, description="Share of docs that may be quarantined")
    lease_ttl: float = Field(
        60.0, ge=2, le=3600, description="Seconds a run may leave its lease on the output unrenewed (it renews every "
        "sixth of this) before another run may take the output over; raise it for slow object stores")
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
        if self.input.words_field is not None:
            columns += [f"{o.name}_missing" for o in self.outputs if o.words != "none"]
        clash = set(columns) & set(self.input.keep_fields) or {c for c in columns if columns.count(c) > 1}
        if clash:
            raise ValueError(f"outputs: column {sorted(clash)[0]!r} would be written twice (an output, its "
                             "_offsets or _missing column, or a keep_field); rename the output")
        if self.long_text.aggregate == "none" and self.long_text.strategy == "truncate":
            raise ValueError("long_text.aggregate: none (one row per window) needs strategy: sliding_window")
        if self.long_text.window_rows and self.input.words_field is not None:
            raise ValueError("input.words_field gives each document one vector per given word, which rows per window "
                             "cannot hold; use long_text.aggregate: mean (each word once, in its document's row)")
        part = self.output.partition_by
        if part not in ("source", "none") and part not in self.input.keep_fields:
            raise ValueError(f"output.partition_by: {part!r} must be 'source', 'none' or one of input.keep_fields")
        return self

    def identity(self) -> dict:
        """Every setting that shapes the stored rows and vectors, plus `fragment_docs`, which
        decides the fragments themselves (not replicas, token_budget or output.uri)."""
        relevant = self.model_dump(include={"input", "model", "outputs", "long_text", "output"})
        relevant["output"].pop("uri")
        if not relevant["model"]["trust_remote_code"]:  # outputs made before the key existed keep their identity
            relevant["model"].pop("trust_remote_code")
        if relevant["input"]["max_line_bytes"] == DEFAULT_MAX_LINE_BYTES:  # the same
            relevant["input"].pop("max_line_bytes")
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
    origin = str(path) if str(path).isprintable() else repr(str(path))
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)  # bounded: the path may be a pipe or /dev/zero
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config {origin}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{origin} is over {MAX_CONFIG_BYTES:,} bytes; a config is a few KB of YAML (is it the "
                          "right file?)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, column = data.count(b"\n", 0, exc.start) + 1, exc.start - data.rfind(b"\n", 0, exc.start)
        raise ConfigError(f"{origin} is not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}, column "
                          f"{column}; save it as UTF-8") from None
    try:
        raw = _yaml_value(text, origin) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections (input, model, outputs, ...)")
    for item in overrides or []:
        apply_override(raw, item)
    return parse_config(raw, origin=origin)


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader within MAX_DEPTH and MAX_VALUES, with keys that are names, and with
    malformed scalars (a 5000-digit int, month 13, `!!bool maybe`) as YAML errors.

    Aliases stay allowed, as a reused anchor is ordinary YAML, but they count expanded: ~1 KB of
    anchors nine deep holds 9**9 values, which pydantic and fsspec would copy for minutes. The
    count stops at the budget, so the check is instant whatever the input.
    """

    def __init__(self, text: str, origin: str):
        super().__init__(text)
        self.origin, self.depth, self.nodes = origin, 0, 0

    def compose_node(self, parent: Any, index: Any) -> yaml.Node:
        # the composer recurses once per level: stop long before Python's recursion limit, and
        # stop counting nodes at the budget rather than compose a megabyte of them
        self.depth, self.nodes = self.depth + 1, self.nodes + 1
        try:
            mark = self.peek_event().start_mark
            if self.depth > MAX_DEPTH:
                raise ConfigError(f"{self.origin}: nested more than {MAX_DEPTH} levels deep (line {mark.line + 1}, "
                                  f"column {mark.column + 1}); a config needs a few")
            if self.nodes > MAX_VALUES:
                raise ConfigError(f"{self.origin}: more than {MAX_VALUES:,} values (line {mark.line + 1}); a config "
                                  "holds a few hundred")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_document(self, node: yaml.Node) -> Any:
        _check_nodes(node, self.origin)
        return super().construct_document(node)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, ArithmeticError, LookupError, TypeError, AttributeError) as exc:  # PyYAML on bad scalars
            shown = _quote(node.value) if isinstance(node.value, str) else "this value"
            raise ConstructorError(None, None, f"cannot read {shown} as {node.tag.rsplit(':', 1)[-1]}: "
                                   f"{str(exc).split(';')[0] or type(exc).__name__}", node.start_mark) from None


_NAME_TAGS = ("tag:yaml.org,2002:str", "tag:yaml.org,2002:merge")


def _check_nodes(root: yaml.Node, origin: str) -> None:
    """Walk a composed document with aliases expanded (an anchor is one node, reached once per
    alias) and stop at the first value past MAX_VALUES or MAX_DEPTH, or a key that is no name."""
    budget, stack = MAX_VALUES, [(root, ())]
    while stack:
        node, path = stack.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(f"{origin}: more than {MAX_VALUES:,} values once YAML aliases are expanded (at "
                              f"{_quote('.'.join(path))}); a config holds a few hundred: reuse fewer anchors")
        if len(path) >= MAX_DEPTH:
            raise ConfigError(f"{origin}: {_quote('.'.join(path))} is nested more than {MAX_DEPTH} levels deep, "
                              "YAML aliases included")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, (*path, str(index))) for index, child in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            names = [key.value for key, _ in node.value if key.tag == "tag:yaml.org,2002:str"]
            twice = next((name for name in names if names.count(name) > 1), None)
            if twice is not None:  # YAML's last-one-wins would silently drop the first
                raise ConfigError(f"{origin}: the key {_quote('.'.join((*path, twice)))} appears twice in one "
                                  "mapping; keep one")
            for key, value in node.value:
                if key.tag not in _NAME_TAGS:
                    shown = _quote(key.value) if isinstance(key.value, str) else f"a {key.id}"
                    raise ConfigError(f"{origin}: the key {shown} at line {key.start_mark.line + 1} is read as "
                                      f"{key.tag.rsplit(':', 1)[-1]}, not a name; quote it, or remove it")
                stack.append((value, (*path, key.value)))


def _yaml_value(text: str, origin: str) -> Any:
    """`text` as YAML within the limits: yaml.YAMLError when malformed, ConfigError past a limit."""
    loader = _ConfigLoader(text, origin)
    try:
        return loader.get_single_data()
    except RecursionError:  # a backstop: the depth checks above leave nothing known to recurse this far
        raise ConfigError(f"{origin}: nested too deeply to read (merge keys or aliases?)") from None
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's problem and where it is, in one line (its own text spans several)."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem and mark:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(exc).splitlines()[0]


def parse_config(raw: dict, origin: str = "config") -> StrataConfig:
    try:
        return StrataConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors()]
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ConfigError(f"{origin}: " + "; ".join(problems[:5]) + more) from None


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
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {_quote(item)}: expected key.path=value, e.g. --set output.uri=./out/run2")
    parts = key.split(".")
    if len(parts) > MAX_DEPTH or not all(parts):
        raise ConfigError(f"--set {_quote(key)}: a key path is up to {MAX_DEPTH} names joined by dots, e.g. output.uri")
    try:
        value = _yaml_value(value_text, f"--set {_quote(key)}")
    except yaml.YAMLError:
        value = value_text  # not YAML (e.g. *.jsonl): the text itself
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            index = int(part) if re.fullmatch(r"[0-9]{1,9}", part) else len(node)  # ASCII digits only: int() takes more
            if index >= len(node):
                raise ConfigError(f"--set {_quote(key)}: {_quote(part)} is not an index of the {len(node)}-item list")
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {_quote(key)}: {_quote('.'.join(parts[:depth]))} is a value, not a section")


def redacted(config: StrataConfig) -> dict:
    """The config as plain data with `storage.options` values masked: what strata prints or stores."""
    data = config.model_dump(mode="json")
    data["storage"]["options"] = {key: "***" for key in data["storage"]["options"]}
    return data


def to_yaml(config: StrataConfig) -> str:
    return yaml.safe_dump(redacted(config), sort_keys=False)
