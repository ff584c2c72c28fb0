"""A simulated accelerator for benchmarks: it computes nothing and takes the time a device of a
given speed would, while leaving the CPU free, as a GPU kernel does.

`strata bench --device sim:TOKENS_PER_S` puts it in place of the encoder, so whether a model
replica keeps a device busy can be measured and engineered on a machine without one. It models
one CUDA stream:

- a forward pass is *launched*: it returns at once, and the device works on it for
  `padded tokens / tokens_per_s` seconds after the work queued before it;
- at most `QUEUE_DEPTH` passes wait in the queue; launching another blocks until the oldest
  ends (CUDA's launch queue is finite too);
- reading a result on the host *synchronizes*: it waits until the queue is empty.

Tensors live on PyTorch's `meta` device: shapes and dtypes without data, so the pooling and
accumulation after the pass cost the host only their (tiny) dispatch, as on a GPU, and an
operation whose output shape depends on values (boolean-mask indexing, `nonzero`, `.item()`) fails
here instead of silently synchronizing a real device. Vectors read back are noise.

Never a run option: results are not embeddings. Only benchmarks and tests import this module.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from pipeline.spec import Simulation

META = torch.device("meta")
QUEUE_DEPTH = 4  # passes launched ahead of the device; CUDA's queue (~1,000 kernels) holds ~5 bert-base passes


class SimulatedDevice:
    """The clock of one simulated stream. Thread-safe: two fragments may launch at once."""

    def __init__(self, simulation: Simulation, clock=time.perf_counter, sleep=time.sleep):
        self.simulation = simulation
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._ends: deque[float] = deque()  # end times of the queued passes, in launch order
        self.busy_s = 0.0  # seconds the device computed
        self.first_start: float | None = None  # when the first pass began
        self.free_at = 0.0  # when the device has done everything launched so far
        self.passes = 0
        self.tokens = 0
        self.gaps: list[float] = []  # idle seconds before each pass that found the device idle

    def launch(self, padded_tokens: int) -> None:
        """Queue one pass over `padded_tokens` positions; returns when the queue has room."""
        seconds = padded_tokens / self.simulation.tokens_per_s
        while True:
            with self._lock:
                now = self._clock()
                while self._ends and self._ends[0] <= now:
                    self._ends.popleft()
                if len(self._ends) < QUEUE_DEPTH:
                    start = max(now, self.free_at)
                    if self.first_start is not None and now > self.free_at:
                        self.gaps.append(now - self.free_at)
                    self.free_at = start + seconds
                    self._ends.append(self.free_at)
                    self.busy_s += seconds
                    self.passes += 1
                    self.tokens += padded_tokens
                    if self.first_start is None:
                        self.first_start = start
                    return
                wait = self._ends[0] - now
            self._sleep(wait)

    def synchronize(self) -> None:
        """Wait until every launched pass has ended (what reading a result does), then report."""
        with self._lock:
            wait = self.free_at - self._clock()
        if wait > 0:
            self._sleep(wait)
        self._report()

    def stats(self) -> dict:
        """busy_s: seconds computing; span_s: first pass's start to the last's end;
        busy_share = busy_s / span_s (1.0 = never idle once started)."""
        with self._lock:
            span = self.free_at - self.first_start if self.first_start is not None else 0.0
            return {"tokens_per_s": self.simulation.tokens_per_s, "passes": self.passes, "padded_tokens": self.tokens,
                    "busy_s": self.busy_s, "span_s": span, "busy_share": self.busy_s / span if span > 0 else None,
                    "idle_gaps": len(self.gaps), "longest_gaps_s": sorted(self.gaps, reverse=True)[:5]}

    def _report(self) -> None:
        if self.simulation.stats_file:
            path = Path(self.simulation.stats_file)
            temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
            temporary.write_text(json.dumps(self.stats()))
            temporary.replace(path)


class SimulatedEncoder(torch.nn.Module):
    """Stands in for `encoder.Encoder`: hidden states 0..depth of the right shapes, on `meta`."""

    def __init__(self, device: SimulatedDevice, depth: int, hidden: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.device, self.depth, self.hidden, self.dtype = device, depth, hidden, dtype
        # PyTorch imports its meta kernels' machinery (~1 s) at the first meta operation: here, at
        # the replica's start (where a GPU initializes CUDA), not inside the first fragment
        state = torch.empty(1, 2, hidden, dtype=dtype, device=META)
        (state.float() * torch.ones(1, 2, 1, dtype=torch.bool, device=META)).sum(dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        # input_ids, attention_mask: (B, T) on meta -> depth + 1 tensors of (B, T, D) on meta
        batch, width = input_ids.shape
        self.device.launch(batch * width)
        state = torch.empty(batch, width, self.hidden, dtype=self.dtype, device=META)
        return (state,) * (self.depth + 1)


def to_meta(array: np.ndarray) -> torch.Tensor:
    """A host array moved to the simulated device: the host pays one copy, as into pinned memory."""
    return torch.from_numpy(np.array(array, copy=True)).to(META)


_NOISE = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)


def to_host(tensor: torch.Tensor, device: SimulatedDevice) -> np.ndarray:
    """A result read back: waits for the device, then one host buffer of its shape, filled with
    (repeating) standard normal noise, so that what is done with it later (float16 conversion,
    Parquet encoding and compression) costs what it costs for real vectors, not for zeros."""
    device.synchronize()
    dtype = torch.empty(0, dtype=tensor.dtype).numpy().dtype
    return np.resize(_NOISE.astype(dtype), tensor.shape)
