"""The encoder on its device: a Hugging Face model loaded cut at the deepest layer an output needs.

Layer numbering is the one of `output_hidden_states`: 0 is the embedding output, i is the
output of encoder layer i, so a model with N layers has N + 1 hidden states. The deeper layers
are dropped from the module list (early exit), so they are never run and their weights leave
memory. Only model replicas import this module (and torch).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.errors import ModelError
from pipeline.model import weights_file
from pipeline.spec import DeviceOptions


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


class Encoder(nn.Module):
    """A Hugging Face encoder cut after layer `depth`; returns hidden states 0..depth."""

    def __init__(self, path: str, depth: int, dtype: torch.dtype, device: torch.device,
                 options: DeviceOptions = DeviceOptions()):
        super().__init__()
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the pooler weights we skip are not worth a warning
        hf_logging.disable_progress_bar()  # nor is a "Loading weights" bar per replica
        model, loading = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation=options.attention,
                                                   output_loading_info=True)
        # transformers fills tensors the weights lack with random values, and only logs it
        missing = sorted(key for key in loading["missing_keys"] if not key.startswith("pooler."))
        if missing:
            raise ModelError(f"cannot load the weights of {path}: {weights_file(Path(path)).name} lacks "
                             f"{len(missing)} of the model's tensors ({missing[0]}, ...); config.json describes another "
                             "model")
        layers = _layer_list(model)
        if depth > len(layers):
            raise ModelError(f"asked for layer {depth} but {path} has {len(layers)} layers")
        del layers[depth:]  # early exit: deeper layers are never run
        if getattr(model, "pooler", None) is not None:
            model.pooler = None
        self.model = model.to(device).eval()
        if options.compile:  # shapes change with every micro-batch: compiled for dynamic shapes
            self.model = torch.compile(self.model, mode=options.compile, dynamic=True)
        self.depth = depth

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # input_ids, attention_mask: (B, T) -> depth + 1 tensors of (B, T, D)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states


def _layer_list(model: nn.Module) -> nn.ModuleList:
    for owner in ("encoder", "transformer"):
        layers = getattr(getattr(model, owner, None), "layer", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ModelError(f"{type(model).__name__} is not a supported encoder (no encoder.layer list)")
