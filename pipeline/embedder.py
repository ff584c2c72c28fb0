"""The model replica: token ids of one fragment in, pooled output vectors out.

Loads the encoder once (cut at the deepest layer any output needs), packs the fragment's
documents into length-sorted token-budget micro-batches, runs ONE forward pass per micro-batch
for all outputs, pools and combines on the device, and moves only the pooled vectors to the
host. Plain Python: the Ray actor is a thin wrapper around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.batching import pack_micro_batches, padded_tokens
from pipeline.extract import ResolvedOutput, compute_output
from pipeline.model import Encoder, ModelInfo, pick_device, pick_dtype

PRECISIONS = {"float16": (torch.float16, np.float16), "float32": (torch.float32, np.float32)}


@dataclass(frozen=True)
class EmbedSettings:
    model: ModelInfo
    outputs: tuple[ResolvedOutput, ...]
    dtype: str  # auto | bfloat16 | float16 | float32
    token_budget: int
    precision: str  # float16 | float32
    cpu_threads: int | None = None  # torch threads on a CPU replica; None = torch's default


@dataclass
class EmbedResult:
    vectors: dict[str, np.ndarray]  # output name -> (N, *vector_shape)
    padded_tokens: int


class Embedder:
    def __init__(self, settings: EmbedSettings, device: torch.device | None = None):
        self.settings = settings
        self.device = device or pick_device()
        if self.device.type == "cpu" and settings.cpu_threads:
            torch.set_num_threads(settings.cpu_threads)
        depth = max(out.depth for out in settings.outputs)
        self.encoder = Encoder(settings.model.path, depth, pick_dtype(settings.dtype, self.device), self.device)
        self.torch_precision, self.numpy_precision = PRECISIONS[settings.precision]

    def embed(self, ids: np.ndarray, lengths: np.ndarray) -> EmbedResult:
        """ids: all documents' token ids back to back; lengths: (N,) tokens per document."""
        hidden_size = self.settings.model.hidden_size
        vectors = {
            out.name: np.empty((len(lengths), *out.vector_shape(hidden_size)), self.numpy_precision)
            for out in self.settings.outputs
        }
        batches = pack_micro_batches(lengths, self.settings.token_budget)
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        for batch in batches:
            input_ids, mask = self._padded_batch(ids, offsets, lengths, batch)
            hidden_states = self.encoder(input_ids, mask)  # depth + 1 of (B, T, D)
            for out in self.settings.outputs:
                pooled = compute_output(hidden_states, mask, out).to(self.torch_precision)
                vectors[out.name][batch] = pooled.cpu().numpy()
        return EmbedResult(vectors, padded_tokens(lengths, batches))

    def _padded_batch(self, ids, offsets, lengths, batch) -> tuple[torch.Tensor, torch.Tensor]:
        # -> input_ids (B, T) int64, attention mask (B, T) int64, T = longest in batch
        batch_lengths = lengths[batch]
        width = int(batch_lengths.max())
        mask = np.arange(width)[None, :] < batch_lengths[:, None]  # (B, T) bool
        input_ids = np.zeros((len(batch), width), np.int64)
        input_ids[mask] = np.concatenate([ids[offsets[d] : offsets[d + 1]] for d in batch])
        pin = self.device.type == "cuda"
        tensors = [torch.from_numpy(a) for a in (input_ids, mask.astype(np.int64))]
        if pin:
            tensors = [t.pin_memory() for t in tensors]
        return tuple(t.to(self.device, non_blocking=pin) for t in tensors)
