"""Fault injection for testing the recovery paths; inert unless STRATA_FAULT is set.

    STRATA_FAULT=kill-embed-once:/path/marker  the first embed call to find no marker file
                                               creates it, then kills its own worker process
    STRATA_FAULT=kill-embed-at:ROW             every embed call for the fragment starting at
                                               input row ROW kills its worker process
    STRATA_FAULT=kill-run-at:N                 the driver kills itself once N fragments were
                                               committed in this run (a run dying mid-version)

The kill lands after the fragment's forward passes and before anything is written, the way a
kernel OOM kill, a segfault in native code or a lost spot node hits a real run.
"""

from __future__ import annotations

import os
import signal


def maybe_kill(step: str, start_row: int) -> None:
    """Kill this process when STRATA_FAULT names this step and `start_row` (a fragment's first
    row, or for the run a count of commits)."""
    kind, _, marker = os.environ.get("STRATA_FAULT", "").partition(":")
    if kind == f"kill-{step}-at" and int(marker) == start_row:
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == f"kill-{step}-once":
        try:
            with open(marker, "x"):
                pass
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)
