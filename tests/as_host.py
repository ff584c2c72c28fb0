"""Run strata's CLI as a process on another host would: `python tests/as_host.py HOST SKEW_S ARGS...`
runs `strata ARGS...` with `socket.gethostname()` answering HOST and the wall clock of the lease
(the clock a run stamps its lease with) SKEW_S seconds off; the monotonic clock is untouched, as
on a real host. Two drivers on one machine then look like two hosts whose clocks disagree.
(Only the lease's clock moves: Ray pickles functions and refuses a replaced `time.time`.)"""

import socket
import sys
import time
import types

host, skew = sys.argv[1], float(sys.argv[2])
socket.gethostname = lambda: host
sys.argv = ["strata", *sys.argv[3:]]

from pipeline import lease  # noqa: E402 - after the host is in place
from pipeline.cli import main  # noqa: E402

lease.time = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
lease.time.time = lambda: time.time() + skew

main()
