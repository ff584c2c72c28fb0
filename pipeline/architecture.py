"""What kind of encoder a model folder holds, read the way transformers reads it: which
architecture, how many layers and where they are, the longest sequence its positions allow,
which inputs it takes, and which tokenizer `AutoTokenizer` gives for it.

Every rule here is found from the model itself, not from a list of model types: the layers are
the modules transformers records hidden states from (`_can_record_outputs`), else the one module
list as long as `num_hidden_layers`; a position table whose `padding_idx` is set reserves the
positions up to it (RoBERTa's `create_position_ids_from_input_ids`: the first token sits at
`padding_idx + 1`); `token_type_ids` go in when the tokenizer makes them and the model takes them.

transformers imports torch, and the driver of a run stays torch-free, so `inspect_architecture`
runs the inspection (`python -m pipeline.architecture FOLDER`) in a child process unless torch is
already loaded, and caches its answer per folder content, transformers version and
`trust_remote_code`. The inspection builds the model on the meta device: no weights are read.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from pipeline.errors import ModelError, described, escaped
from pipeline.tokenize import MODEL_AS_TOKENIZERS_READS_IT, load_backend

INSPECTION_VERSION = 3  # bump when what `_inspect` reports changes: cached answers are then ignored
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".ot", ".gguf")
DOCUMENTATION = (".md", ".rst", ".png", ".jpg", ".gitattributes")
TOKENIZER_PARTS = ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder", "model")
SUPPORTED = ("BERT-family encoders: BERT, DistilBERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, ALBERT, MPNet, "
             "DeBERTa(-v2/v3), ModernBERT, EuroBERT, NomicBERT, GTE, ... (README: Supported models)")


@dataclass(frozen=True)
class Architecture:
    """An encoder's shape as the replicas will run it. `position_limit`: the most tokens one
    sequence may hold (special tokens included), None when the model sets no limit."""

    model_class: str  # transformers' class AutoModel builds ("ModernBertModel")
    num_layers: int  # hidden states are numbered 0 (embeddings) .. num_layers
    position_limit: int | None
    position_rule: str  # how position_limit follows from config.json, for messages
    token_type_ids: bool  # the tokenizer makes token_type_ids and the model takes them
    tokenizer_overrides: str | None  # JSON: the parts of tokenizer.json AutoTokenizer builds otherwise
    attention: str  # the attention implementation transformers picks: sdpa where supported, else eager
    custom_code: bool  # the folder's own Python (auto_map) builds the model


def inspect_architecture(folder: Path, trust_remote_code: bool = False) -> Architecture:
    """The folder's architecture, from the cache or a fresh inspection.

    Raises ModelError (one line) for a folder strata cannot embed: custom code without
    `model.trust_remote_code`, a decoder-only or encoder–decoder model, hidden states strata
    cannot number, a config transformers cannot read.
    """
    cache = _cache_file(folder, trust_remote_code)
    if cache is not None and cache.is_file():
        try:
            return Architecture(**json.loads(cache.read_text()))
        except (OSError, ValueError, TypeError):
            pass  # a damaged or older entry: inspect again
    if "torch" in sys.modules:  # validate, bench, tests: transformers costs nothing more here
        answer = _answer(folder, trust_remote_code)
    else:
        answer = _answer_in_child(folder, trust_remote_code)
    if "error" in answer:
        raise ModelError(answer["error"])
    if cache is not None:
        _write_atomically(cache, json.dumps(answer["architecture"]))
    return Architecture(**answer["architecture"])


def _answer(folder: Path, trust_remote_code: bool) -> dict:
    try:
        return {"architecture": asdict(_inspect(folder, trust_remote_code))}
    except ModelError as exc:
        return {"error": str(exc)}


def _answer_in_child(folder: Path, trust_remote_code: bool) -> dict:
    command = [sys.executable, "-m", "pipeline.architecture", str(folder)]
    if trust_remote_code:
        command.append("--trust-remote-code")
    try:
        done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelError(f"cannot inspect the model folder {folder}: {escaped(str(exc))}") from None
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        cause = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise ModelError(f"cannot inspect the model folder {folder}: {escaped(cause)[:300]}") from None


def model_files_sha256(folder: Path, tokenizer_overrides: str | None = None) -> str:
    """sha256 of what shapes a model's vectors besides its weights: every file of the folder but
    the weights and the documentation (config.json, the tokenizer's files, custom code, ...),
    and the tokenizer parts AutoTokenizer builds otherwise (they change with transformers).
    Raises OSError when a file cannot be read."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        name = path.name
        if path.is_file() and not name.startswith(".") and not name.endswith(WEIGHT_SUFFIXES + DOCUMENTATION) \
                and not name.upper().startswith("LICENSE"):
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    digest.update(b"\0" + (tokenizer_overrides or "").encode())
    return digest.hexdigest()


def _cache_file(folder: Path, trust_remote_code: bool) -> Path | None:
    """Where the answer for this folder's content is kept; None when the folder cannot be read
    (the inspection then says why)."""
    try:
        files = model_files_sha256(folder)
    except OSError:
        return None
    key = hashlib.sha256(f"{INSPECTION_VERSION}\0{_transformers_version()}\0{trust_remote_code}\0{files}".encode())
    root = Path(os.environ.get("STRATA_CACHE", Path.home() / ".cache" / "strata"))
    return root / "architectures" / f"{key.hexdigest()[:24]}.json"


def _transformers_version() -> str:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "none"


def _write_atomically(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(text)
        partial.replace(path)
    except OSError:
        pass  # a cache that cannot be written costs an inspection next time, nothing else


# --- the inspection itself: transformers and torch from here on ---

def _inspect(folder: Path, trust_remote_code: bool) -> Architecture:
    import torch
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    raw = _json(folder / "config.json")
    model_type = raw.get("model_type")
    custom = bool(raw.get("auto_map")) and (trust_remote_code or model_type not in CONFIG_MAPPING_NAMES)
    if custom and not trust_remote_code:
        names = ", ".join(sorted(str(v) for v in raw["auto_map"].values() if isinstance(v, str))) or "auto_map"
        raise ModelError(
            f"{folder / 'config.json'} asks for the folder's own code ({names}), which transformers cannot load "
            "natively; strata runs it only with model.trust_remote_code: true (it runs that folder's Python on "
            "every node)")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - unknown model_type, a field of the wrong type, ...
        unknown = f"; strata embeds {SUPPORTED}" if model_type not in CONFIG_MAPPING_NAMES else ""
        raise ModelError(f"transformers cannot read {folder / 'config.json'}: {described(exc)}{unknown}") from None
    what = f"{folder} holds a {config.model_type} model"
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"{what}, an encoder–decoder; strata embeds {SUPPORTED}")
    if not custom and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        kind = "which transformers knows as a causal (decoder) language model, not as a masked-language-model " \
            "encoder" if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else \
            "which transformers does not know as a masked-language-model encoder"
        raise ModelError(f"{what}, {kind}; strata embeds {SUPPORTED}")
    try:
        with torch.device("meta"):
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - a config its own class refuses
        raise ModelError(f"transformers cannot build the model of {folder / 'config.json'}: {described(exc)}") from None
    num_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ModelError(f"{what} whose config.json names no num_hidden_layers; strata embeds {SUPPORTED}")
    if find_layers(model, num_layers) is None:
        raise ModelError(f"{what} ({type(model).__name__}) whose {num_layers} layers strata cannot find; "
                         f"strata embeds {SUPPORTED}")
    limit, rule = position_limit(model, config)
    load_backend(str(folder))  # a broken tokenizer.json is named as the workers would name it
    tokenizer = _auto_tokenizer(folder, trust_remote_code)
    takes_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ()) and accepts(model, "token_type_ids")
    return Architecture(type(model).__name__, num_layers, limit, rule, takes_types,
                        tokenizer_overrides(folder, tokenizer.backend_tokenizer),
                        str(getattr(model.config, "_attn_implementation", None) or "eager"), custom)


def _auto_tokenizer(folder: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - unknown tokenizer class, bad vocabulary file, ...
        raise ModelError(f"transformers cannot load the tokenizer of {folder}: {described(exc)}") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ModelError(f"the tokenizer of {folder} ({type(tokenizer).__name__}) has no fast (Rust) version; "
                         "strata tokenizes with the tokenizers library: add a tokenizer.json")
    return tokenizer


def tokenizer_overrides(folder: Path, backend) -> str | None:
    """The parts of the tokenizer AutoTokenizer builds that tokenizer.json does not hold as they
    are (transformers 5 rebuilds most model-specific tokenizers from the file's vocabulary with
    its own normalizer, pre-tokenizer and post-processor), as JSON; None when the file holds
    them all. Compared as parsed by Python, whose floats are exact (see tokenize.exact_unigram)."""
    from tokenizers import Tokenizer

    built = json.loads(backend.to_str())
    file = folder / "tokenizer.json"
    stored = _json(file) if file.is_file() else {}
    changed = {part: built.get(part) for part in TOKENIZER_PARTS if stored.get(part) != built.get(part)}
    if "model" in changed and file.is_file():  # a tokenizer class that reads the file with tokenizers itself
        try:
            if json.loads(Tokenizer.from_file(str(file)).to_str()).get("model") == built.get("model"):
                changed["model"] = MODEL_AS_TOKENIZERS_READS_IT
        except Exception:  # noqa: BLE001 - a file tokenizers cannot read: the model travels whole
            pass
    return json.dumps(changed) if changed else None


def find_layers(model, num_layers: int):
    """The encoder layers of `model`: (the module list holding them or None, the layer modules).

    The layers are the modules transformers records hidden states from, else the only module list
    of `num_layers` modules. ALBERT shares one layer across its depth: its list is shorter than
    num_layers (None is returned for the list, the shared modules as layers). None when neither
    rule finds them.
    """
    from torch import nn

    spec = (getattr(model, "_can_record_outputs", None) or {}).get("hidden_states")
    if isinstance(spec, list):
        spec = spec[0] if spec else None
    target = getattr(spec, "target_class", spec)
    layers = [m for m in model.modules() if isinstance(target, type) and isinstance(m, target)]
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if layers:
        holder = [m for m in lists if all(any(layer is x for x in m) for layer in layers)]
        return (holder[0] if len(holder) == 1 else None), layers
    if len(lists) == 1:
        return lists[0], list(lists[0])
    return None


def position_limit(model, config) -> tuple[int | None, str]:
    """The most tokens a sequence may hold: max_position_embeddings, less the positions a
    padding_idx-based table reserves (RoBERTa and its kin: ids start at padding_idx + 1).
    Absolute tables are found by size (any module whose 2-D weight has max_position_embeddings
    rows: nn.Embedding, I-BERT's QuantEmbedding); models with rotary or relative positions keep
    max_position_embeddings, the length they were trained for."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions < 1:
        return None, "config.json sets no max_position_embeddings"
    tables = [(name, m) for name, m in model.named_modules() if _rows(m) == positions]
    tables.sort(key=lambda item: "position" not in item[0])  # a table named for positions first
    padding = getattr(tables[0][1], "padding_idx", None) if tables else None
    if isinstance(padding, int) and padding >= 0:
        reserved = padding + 1
        return positions - reserved, (f"max_position_embeddings {positions} less the {reserved} positions its "
                                      f"position table reserves for padding (padding_idx {reserved - 1})")
    return positions, f"max_position_embeddings {positions}"


def _rows(module) -> int | None:
    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def accepts(model, name: str) -> bool:
    """Whether the model's forward has a parameter `name`."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return name in parameters


def _json(file: Path) -> dict:
    try:
        data = json.loads(file.read_bytes())
    except (OSError, ValueError, RecursionError):
        return {}  # resolve_model reads these files first and names what is wrong with them
    return data if isinstance(data, dict) else {}


def main(argv: list[str]) -> int:
    """`python -m pipeline.architecture FOLDER [--trust-remote-code]`: one JSON line on stdout."""
    import warnings

    warnings.simplefilter("ignore")
    answer = _answer(Path(argv[0]), "--trust-remote-code" in argv[1:])
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
