"""Host memory of a whole `strata run`: the peak of the summed proportional set size (PSS) of the
driver and every process it starts (Ray's GCS, raylet and object store, the workers).

PSS splits shared pages (the object store's shared memory, shared libraries) among the
processes that map them, so the sum is the machine's memory actually used by the run, not a
multiple of it. `strata bench --memory-scale K` runs the same config on N and K×N documents and
compares the peaks: a pipeline that streams keeps the ratio near 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from pipeline.errors import StrataError

SAMPLE_SECONDS = 0.2


def tree_pss(root: psutil.Process) -> int:
    """Bytes of PSS of a process and all its descendants (processes that exit meanwhile count 0)."""
    total = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for process in processes:
        try:
            total += process.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def peak_memory_of_run(config_file: Path, log_file: Path) -> int:
    """Run `strata run CONFIG` in a fresh process (and a fresh local Ray); returns its peak PSS."""
    with log_file.open("w") as log:
        # RAY_ADDRESS=local: a cluster of its own, even when this process already joined one
        process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config_file)],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "RAY_ADDRESS": "local"})
        root, peak = psutil.Process(process.pid), 0
        while process.poll() is None:
            peak = max(peak, tree_pss(root))
            time.sleep(SAMPLE_SECONDS)
    if process.returncode != 0:
        raise StrataError(f"strata run {config_file} exited with {process.returncode}; see {log_file}")
    return peak
