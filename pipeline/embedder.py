"""The model replica: a fragment's token windows in, output vectors out.

Loads the encoder once (cut at the deepest layer any output needs), packs the fragment's
windows into length-sorted token-budget micro-batches, runs ONE forward pass per micro-batch
for all outputs, pools on the device into per-output accumulators, and moves only finished
vectors to the host. Plain Python: the Ray actor is a thin wrapper around it.
"""

from __future__ import annotations

import os

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.batching import pack_micro_batches, padded_tokens, pass_overhead_tokens
from pipeline.encoder import Encoder, pick_device, pick_dtype
from pipeline.extract import Accumulator, pool_windows, token_vectors
from pipeline.spec import EmbedSettings
from pipeline.tokenize import TokenWindows
from pipeline.units import RowPlan, TokenUnits, row_plan, token_units

PRECISIONS = {"float16": (torch.float16, np.float16), "float32": (torch.float32, np.float32)}


@dataclass
class EmbedResult:
    rows: RowPlan
    vectors: dict[str, np.ndarray]  # output name -> (units, *vector_shape)
    token_units: dict[str, TokenUnits]  # token-level outputs: units per row, character spans
    padded_tokens: int
    failed_docs: dict[int, str]  # document index -> why it could not be embedded (its rows are junk)


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA or CPU allocation failure (torch raises RuntimeError for the latter)."""
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


class Embedder:
    """One model replica. With `settings.simulation`, a simulated device (`simulated.py`) stands in
    for the encoder: the same host code runs, the device's time is simulated."""

    def __init__(self, settings: EmbedSettings, device: torch.device | None = None):
        self.settings = settings
        depth = max(out.depth for out in settings.outputs)
        self.simulated = None
        if settings.simulation is not None:
            from pipeline.simulated import META, SimulatedDevice, SimulatedEncoder

            self.device, self.simulated = META, SimulatedDevice(settings.simulation)
            dtype = pick_dtype(settings.dtype, torch.device("cuda"))  # what a GPU replica would compute in
            self.encoder = SimulatedEncoder(self.simulated, depth, settings.model.hidden_size, dtype)
        else:
            self.device = device or pick_device()
            if self.device.type == "cpu" and settings.cpu_threads:
                # the driver sizes threads from the whole cluster's CPUs; never more than this machine's cores
                torch.set_num_threads(min(settings.cpu_threads, _usable_cores()))
            self.encoder = Encoder(settings.model, depth, pick_dtype(settings.dtype, self.device), self.device,
                                   settings.device_options)
        self.torch_precision, self.numpy_precision = PRECISIONS[settings.precision]

    def embed(self, windows: TokenWindows) -> EmbedResult:
        hidden = self.settings.model.hidden_size
        plan = row_plan(windows, self.settings.window_rows)
        units = {out.name: token_units(windows, plan, out.words) for out in self.settings.outputs if out.token_level}
        accumulators = {
            out.name: Accumulator(units[out.name].slots if out.token_level else plan.rows, out, hidden, self.device)
            for out in self.settings.outputs
        }
        starts = windows.starts
        overhead = self.settings.device_options.pass_overhead
        if overhead is None:
            overhead = pass_overhead_tokens(self.device.type, self.settings.token_budget)
        equal = getattr(self.encoder, "needs_equal_lengths", False)
        budget = 1 if getattr(self.encoder, "needs_one_window", False) else self.settings.token_budget  # one each
        todo = pack_micro_batches(windows.lengths, budget, overhead, equal)[::-1]
        done, failed = [], {}
        while todo:  # a stack: a micro-batch that runs out of memory is split in halves and retried
            batch = todo.pop()
            try:
                contributions = self._forward(windows, starts, batch, plan, units)
            except Exception as exc:  # noqa: BLE001 - only allocation failures are handled here
                if not is_out_of_memory(exc):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if len(batch) > 1:
                    todo += [batch[len(batch) // 2 :], batch[: len(batch) // 2]]
                else:
                    doc = int(windows.doc[batch[0]])
                    failed[doc] = f"out of memory embedding a window of {int(windows.lengths[batch[0]])} tokens alone"
                continue
            for name, (index, values, weights) in contributions.items():
                accumulators[name].add(index, values, weights)
            done.append(batch)
        vectors = {name: self._to_host(acc.result().to(self.torch_precision)) for name, acc in accumulators.items()}
        return EmbedResult(plan, vectors, units, padded_tokens(windows.lengths, done), failed)

    def _forward(self, windows: TokenWindows, starts: np.ndarray, batch: np.ndarray, plan: RowPlan,
                 units: dict[str, TokenUnits]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One forward pass; per output what it adds to its accumulator: (unit index, values, weights).
        Nothing is added here, so a pass that fails half-way leaves the accumulators untouched."""
        width = int(windows.lengths[batch].max())
        positions = np.arange(width)[None, :]
        valid = positions < windows.lengths[batch][:, None]  # (B, T)
        input_ids = self._to_device(_padded(windows.ids, starts, batch, valid, 0))
        mask = self._to_device(valid.astype(np.int64))
        if windows.type_ids is None:
            hidden_states = self.encoder(input_ids, mask)  # depth + 1 of (B, T, D)
        else:
            hidden_states = self.encoder(input_ids, mask, self._to_device(_padded(windows.type_ids, starts, batch, valid, 0)))
        lo, hi = plan.owned[batch, 0:1], plan.owned[batch, 1:2]
        owned = self._to_device((positions >= lo) & (positions < hi))
        contributions = {}
        for out in self.settings.outputs:
            if out.token_level:  # which positions feed which slot, decided on the host: no device sync
                feeds = [_padded(per_token, starts, batch, valid, -1).reshape(-1)
                         for per_token in (units[out.name].unit, units[out.name].also) if per_token is not None]
                emit = np.concatenate([np.flatnonzero(feed >= 0) for feed in feeds])
                slots = np.concatenate([feed[feed >= 0] for feed in feeds])
                contributions[out.name] = (self._to_device(slots),
                                           token_vectors(hidden_states, self._to_device(emit), out),
                                           torch.ones(len(emit), device=self.device))
            else:
                values, weights = pool_windows(hidden_states, owned, out)
                contributions[out.name] = (self._to_device(plan.row_of_window[batch]), values, weights)
        return contributions

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        if self.simulated is not None:
            from pipeline.simulated import to_meta

            return to_meta(array)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _to_host(self, tensor: torch.Tensor) -> np.ndarray:
        # the one place the host waits for the device: once per output at the end of a fragment
        if self.simulated is not None:
            from pipeline.simulated import to_host

            return to_host(tensor, self.simulated)
        return tensor.cpu().numpy()


def _padded(flat: np.ndarray, starts: np.ndarray, batch: np.ndarray, valid: np.ndarray, fill: int) -> np.ndarray:
    # the batch's windows of a flat per-token array as a (B, T) int64 array, `fill` where padded
    padded = np.full(valid.shape, fill, np.int64)
    padded[valid] = np.concatenate([flat[starts[w] : starts[w + 1]] for w in batch])
    return padded


def _usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
