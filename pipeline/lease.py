"""Which run writes an output now: a lease file in its manifest, renewed while the run lives.

Two runs on one output would redo each other's fragments, and one run's start-up clean-up of
files without a commit record could delete a file the other is about to commit. Scheduled runs
make that easy (a RayCronJob starts a run per tick whether or not the last one ended), so a run
takes `_manifest/lease.json` first and renews it every RENEW_S seconds.

A lease found in place is alive while its `renewed` stamp keeps changing. A holder on this host
is dead when its process no longer exists or its stamp is older than TTL_S (one clock). A holder
on another host is dead when its stamp is far older than the TTL, or stays still for TTL_S of
watching it (measured on this host's clock, so clocks of different hosts never need to agree).
Object storage has no create-if-absent here, so two runs starting in the same second could both
win; the read-back after writing narrows that window.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable

import psutil

from pipeline.errors import OutputError
from pipeline.manifest import LEASE_FILE, record_from
from pipeline.storage import Location
RENEW_S = 15.0
TTL_S = 60.0  # a holder that has not renewed for this long is gone
WATCH_EVERY_S = 2.0


class OutputBusy(OutputError):
    """Another live run holds the output."""


@dataclass(frozen=True)
class Holder:
    token: str
    host: str
    pid: int
    started: float  # seconds since the epoch, the holder's clock
    renewed: float

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"process {self.pid} on {self.host}, started {started}"


class Lease:
    def __init__(self, location: Location, ttl: float = TTL_S, renew_every: float = RENEW_S,
                 watch_every: float = WATCH_EVERY_S):
        self.location, self.ttl, self.renew_every, self.watch_every = location, ttl, renew_every, watch_every
        now = time.time()
        self.holder = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self, note: Callable[[str], None] = lambda _: None) -> None:
        """Take the output, waiting out a holder that may be dead; OutputBusy if it is alive."""
        data = self.location.read_optional(LEASE_FILE)
        current = holder_of(data)
        if current is None and data is not None:  # no run writes a lease like that
            note(f"strata: {self.location.uri(LEASE_FILE)} is damaged (not a lease strata writes); taking it over")
        if current is not None and current.token != self.holder.token and not self._gone(current, note):
            raise OutputBusy(f"output {self.location.uri()} is being written by another run ({current.describe()}); "
                             "two runs on one output redo each other's work: wait for it, or stop it first")
        self._write(time.time())
        if (winner := self._read()) is not None and winner.token != self.holder.token:
            raise OutputBusy(f"output {self.location.uri()} was taken by another run starting at the same moment "
                             f"({winner.describe()})")
        self._renewer = threading.Thread(target=self._renew, name="strata-lease", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        """Give the output back. Best effort: when the output cannot be written any more (a full
        or read-only disk, a deleted folder) the lease simply runs out, and the run's own error says why."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            current = self._read()
            if current is not None and current.token == self.holder.token:
                self.location.remove(LEASE_FILE)
        except Exception:  # noqa: BLE001 - see above
            pass

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _gone(self, other: Holder, note: Callable[[str], None]) -> bool:
        if other.host == self.holder.host:
            return other.pid == self.holder.pid or surely_dead(other, self.ttl)
        if surely_dead(other, self.ttl):
            return True
        note(f"strata: the output has a lease of {other.describe()}; checking for up to {self.ttl:.0f} s "
             "whether that run is still alive")
        deadline = time.monotonic() + self.ttl
        while time.monotonic() < deadline:
            time.sleep(self.watch_every)
            now = self._read()
            if now is None:
                return True
            if now != other:
                return False
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                self._write(time.time())
            except Exception:  # noqa: BLE001 - storage hiccup: the next renewal comes before the TTL runs out
                continue

    def _write(self, renewed: float) -> None:
        holder = Holder(**{**asdict(self.holder), "renewed": renewed})
        self.location.write_bytes(json.dumps(asdict(holder)).encode(), LEASE_FILE)

    def _read(self) -> Holder | None:
        return current_holder(self.location)


def surely_dead(holder: Holder, ttl: float = TTL_S) -> bool:
    """Whether a lease's run is certainly over: on this host, its process is gone or its stamp
    is older than the TTL (one clock, so the age is exact; a pid may be reused); elsewhere, its
    stamp is older than 10 TTLs. A live-looking lease of another host needs watching (`Lease`)."""
    age = time.time() - holder.renewed
    if holder.host == socket.gethostname():
        return not psutil.pid_exists(holder.pid) or age > ttl
    return age > 10 * ttl


def current_holder(location: Location) -> Holder | None:
    """Who holds the output's lease now, if anyone (a run that died may still hold it, for a while)."""
    return holder_of(location.read_optional(LEASE_FILE))


def holder_of(data: bytes | None) -> Holder | None:
    """The holder a lease file's bytes name; None for no file, or one no run writes like that."""
    if data is None:
        return None
    try:
        return record_from(json.loads(data), Holder, ValueError)
    except (ValueError, TypeError, FileNotFoundError):  # just removed, or damaged: no live run writes it like that
        return None
