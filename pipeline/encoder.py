"""The encoder on its device: a Hugging Face model loaded cut at the deepest layer an output needs.

Layer numbering is the one of `output_hidden_states` on the whole, uncut model: 0 is the
embedding output, i is the output of encoder layer i, so a model with N layers has N + 1 hidden
states. The deeper layers are dropped (early exit), so they are never run and their weights leave
memory. Dropping them must not change a number: models that normalise after their last layer
(pre-LayerNorm RoBERTa, XLM-R-XL, Megatron-BERT, ModernBERT's final_norm, EuroBERT's norm) report
that norm on whatever layer comes last, so a cut model's deepest hidden state is taken from the
layer's own output instead. The cut is checked on a probe sequence at load, against the uncut
model; where it would change a number the model runs whole. Only model replicas import this
module (and torch).
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import nn

from pipeline.architecture import SUPPORTED, accepts, find_layers
from pipeline.errors import ModelError
from pipeline.model import ModelInfo, weights_file
from pipeline.spec import DeviceOptions

PROBE_TOKENS = 12  # a probe sequence: long enough for local attention windows and relative positions to matter
CUT_TOLERANCE = 1e-3  # relative to the largest hidden value: a misplaced norm is off by far more


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


class Encoder(nn.Module):
    """A Hugging Face encoder cut after layer `depth`; returns hidden states 0..depth, each equal
    to the uncut model's."""

    def __init__(self, model: ModelInfo, depth: int, dtype: torch.dtype, device: torch.device,
                 options: DeviceOptions = DeviceOptions()):
        super().__init__()
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the pooler weights we skip are not worth a warning
        hf_logging.disable_progress_bar()  # nor is a "Loading weights" bar per replica
        path = model.path
        loaded, loading = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation=options.attention,
                                                    trust_remote_code=model.trust_remote_code,
                                                    output_loading_info=True)
        # transformers fills tensors the weights lack with random values, and only logs it
        missing = sorted(key for key in loading["missing_keys"] if not key.startswith("pooler."))
        if missing:
            raise ModelError(f"cannot load the weights of {path}: {weights_file(Path(path)).name} lacks "
                             f"{len(missing)} of the model's tensors ({missing[0]}, ...); config.json describes another "
                             "model")
        num_layers = loaded.config.num_hidden_layers
        if depth > num_layers:
            raise ModelError(f"asked for layer {depth} but {path} has {num_layers} layers")
        if getattr(loaded, "pooler", None) is not None:
            loaded.pooler = None
        self.model = loaded.to(device).eval()
        self.token_type_ids = model.token_type_ids and accepts(loaded, "token_type_ids")
        self.depth = depth
        self.tap: LayerTap | None = None
        self._cut(path, num_layers, max(depth, 1))  # one layer at least: hidden state 0 is its input
        if options.compile:  # shapes change with every micro-batch: compiled for dynamic shapes
            self.model = torch.compile(self.model, mode=options.compile, dynamic=True)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        # input_ids, attention_mask, token_type_ids: (B, T) -> depth + 1 tensors of (B, T, D)
        extra = {"token_type_ids": token_type_ids} if self.token_type_ids and token_type_ids is not None else {}
        if self.tap is not None:
            self.tap.outputs.clear()
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **extra)
        hidden_states = tuple(out.hidden_states)
        if self.tap is not None:  # the deepest layer's own output, before any norm the model applies last
            hidden_states = hidden_states[:-1] + (self.tap.outputs[-1],)
        return hidden_states[: self.depth + 1]

    def _cut(self, path: str, num_layers: int, depth: int) -> None:
        """Drop the layers past `depth`, after checking on a probe that hidden states 0..depth stay
        those of the uncut model; where they would not, the model runs whole."""
        probe = _probe(self.model.config, next(self.model.parameters()).device)
        whole = self._run(probe)
        name = type(self.model).__name__
        if len(whole) != num_layers + 1:
            raise ModelError(f"{path}: {name} returns {len(whole)} hidden states for {num_layers} layers; strata "
                             f"embeds {SUPPORTED}")
        if _causal(self, probe, whole[-1]):
            raise ModelError(f"{path}: {name} attends only to earlier tokens (a decoder); strata embeds {SUPPORTED}")
        if depth == num_layers:
            return
        found = find_layers(self.model, num_layers)
        if found is None:
            return
        holder, layers = found
        removed = list(holder[depth:]) if holder is not None else []
        if holder is not None:
            del holder[depth:]
        self.model.config.num_hidden_layers = depth  # models that loop over range(num_hidden_layers) (ALBERT)
        self.tap = LayerTap([layer for layer in layers if all(layer is not r for r in removed)])
        try:
            cut = self._run(probe)
            kept = len(cut) == depth + 1 and all(_close(a, b) for a, b in zip(cut, whole))
        except Exception:  # noqa: BLE001 - a model that cannot run cut runs whole
            kept = False
        if not kept:  # put the layers back: correct numbers first, early exit second
            self.tap.remove()
            self.tap = None
            if holder is not None:
                holder.extend(removed)
            self.model.config.num_hidden_layers = num_layers

    @torch.inference_mode()
    def _run(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        saved, self.depth = self.depth, 10 ** 9
        try:
            return self.forward(input_ids, torch.ones_like(input_ids), torch.zeros_like(input_ids))
        finally:
            self.depth = saved


class LayerTap:
    """Forward hooks that keep what each given layer module returns, in call order (a shared
    layer, as ALBERT's, once per call). Per thread: a replica runs two fragments at once."""

    def __init__(self, layers: list[nn.Module]):
        self._local = threading.local()
        self.handles = [layer.register_forward_hook(self._keep) for layer in layers]

    @property
    def outputs(self) -> list[torch.Tensor]:
        """What the layers returned in this thread's forward passes since the last clear()."""
        if not hasattr(self._local, "outputs"):
            self._local.outputs = []
        return self._local.outputs

    def _keep(self, module, args, output) -> None:
        self.outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _probe(config, device: torch.device) -> torch.Tensor:
    """(1, PROBE_TOKENS) ids spread over the vocabulary, none of them the padding id (RoBERTa-style
    positions skip padding)."""
    vocab = int(getattr(config, "vocab_size", 0) or 100)
    pad = getattr(config, "pad_token_id", None)
    ids = [(37 * k + 11) % vocab for k in range(PROBE_TOKENS)]
    ids = [(i + 1) % vocab if i == pad else i for i in ids]
    return torch.tensor([ids], device=device)


def _causal(encoder: Encoder, probe: torch.Tensor, last: torch.Tensor) -> bool:
    """A decoder's first token cannot see the last one: change the last token and look."""
    changed = probe.clone()
    changed[0, -1] = probe[0, 0] if probe[0, -1] != probe[0, 0] else probe[0, 1]
    return torch.equal(encoder._run(changed)[-1][0, 0], last[0, 0])


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    return a.shape == b.shape and bool((a - b).abs().max() <= CUT_TOLERANCE * max(1.0, float(b.abs().max())))
