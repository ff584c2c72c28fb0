"""Which run writes an output now: a lease in its manifest, taken and renewed with conditional
writes, and a fence that keeps a run which lost it from changing the output.

Two runs on one output would redo each other's fragments, and one run's start-up clean-up could
delete a file the other is about to commit. So a run takes `_manifest/lease.json` before it
changes anything, the way storage systems elect one writer:

- Every write of the lease is conditional (`Location.write_if`: on S3 `If-None-Match: *` to
  create it and `If-Match: <etag>` to renew or take it over; on a local disk the same under a
  lock on the folder): of two runs that read the same lease, one write wins and the other sees
  a Conflict, so two runs never both believe they hold it.
- A live-looking holder is judged by *this* host's monotonic clock: the lease is stale once its
  tag stayed unchanged for the holder's TTL of watching. Another host's timestamps are never
  compared with this host's clock (clocks of different hosts disagree by minutes). On the same
  machine (same boot and pid namespace, so one clock and one pid space) a holder whose process
  is gone is taken over at once.
- Each take-over adds one to the lease `generation`: the fencing token, recorded in every write
  journal, commit record and version. The holder renews every TTL/6; a renewal that finds the
  lease changed means another run took over: this run is fenced (`check` raises LeaseLost) and
  changes nothing more. The driver's Location calls `check` before every write and removal, and
  a run whose last confirmed renewal is older than TTL/2 renews before it may change anything,
  so it stops before another run could have waited out the TTL; so does a run whose renewal left
  the lease unchanged for over TTL/2 (a store too slow for its TTL). Workers confirm the lease
  (`confirm_holder`) before writing a fragment's journal and its commit record.
- A run that ends marks the lease released (keeping its generation) rather than deleting it.

Where the store has no conditional write (neither local nor S3), `write_if` compares and then
writes: a take-over still needs a full TTL of silence, but two runs starting in the same
instant could both win; the README says so.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable

import psutil

from pipeline.errors import OutputError, StrataError
from pipeline.manifest import LEASE_FILE, RUN_FILE, generation_of, record_from
from pipeline.storage import Conflict, Location

TTL_S = 60.0  # a holder whose lease stays unchanged this long (watched here) is gone; run.lease_ttl
MAX_TTL_S = 3600.0  # the longest a lease file may make another run watch it
WATCH_EVERY_S = 2.0


class OutputBusy(OutputError):
    """Another live run holds the output."""


class LeaseLost(OutputError):
    """This run no longer holds the output's lease: it must not change the output."""


@dataclass(frozen=True)
class Holder:
    token: str
    host: str
    pid: int
    started: float  # seconds since the epoch by the holder's clock: for people, never compared across hosts
    renewed: float  # the same clock
    generation: int = 0  # the fencing token: one more at every take-over
    machine: str = ""  # host, boot and pid namespace: one clock and one pid space (see `this_machine`)
    ttl: float = TTL_S  # how long the holder may stay silent before it counts as gone
    beat: int = 0  # renewals so far: every renewal changes the lease
    released: bool = False  # the run ended and gave the output back

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"process {self.pid} on {self.host}, started {started}"

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()


@functools.cache
def this_machine() -> str:
    """What makes two processes share one clock and one pid space: hostname, kernel boot id and
    pid namespace (containers may share a hostname; two boots never share a boot id)."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(open(path).read().strip() if "boot" in path else str(os.stat(path).st_ino))
        except OSError:
            parts.append("?")
    return "/".join(parts)


class Lease:
    def __init__(self, location: Location, ttl: float = TTL_S, watch_every: float = WATCH_EVERY_S):
        self.location, self.ttl, self.watch_every = location, ttl, watch_every
        self.renew_every = ttl / 6  # leaves a renewal TTL/3 to land before `_renew_once` calls it too slow
        now = time.time()
        self.holder = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now,
                             machine=this_machine(), ttl=ttl)
        self.lost: LeaseLost | None = None
        self._tag: str | None = None
        self._confirmed = 0.0  # monotonic time at which the last confirmed write of the lease began
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def generation(self) -> int:
        return self.holder.generation

    @property
    def token(self) -> str:
        return self.holder.token

    def acquire(self, note: Callable[[str], None] = lambda _: None) -> None:
        """Take the output, waiting out a holder that may be dead; OutputBusy if it is alive."""
        for _ in range(4):  # a run that changed the lease meanwhile: look again
            found = self.location.read_tagged(LEASE_FILE)
            data, tag = found if found is not None else (None, None)
            current = holder_of(data)
            if data is not None and current is None:  # no run writes a lease like that
                note(f"strata: {self.location.uri(LEASE_FILE)} is damaged (not a lease strata writes); taking it over")
            elif current is not None and not current.released and not self._gone(current, tag, note):
                raise OutputBusy(f"output {self.location.uri()} is being written by another run "
                                 f"({current.describe()}); two runs on one output redo each other's work: wait "
                                 "for it, or stop it first")
            floor = _generation_in(self.location.read_optional(RUN_FILE))  # a lease removed or damaged by hand
            if self._take(tag, max(current.generation if current else 0, _generation_in(data), floor) + 1):
                self._renewer = threading.Thread(target=self._renew, name="strata-lease", daemon=True)
                self._renewer.start()
                return
        raise OutputBusy(f"output {self.location.uri()} was taken by another run starting at the same moment"
                         + (f" ({current.describe()})" if (current := self._read()) else ""))

    def fenced(self, location: Location) -> Location:
        """`location`, refusing every write and removal once this run may have lost the output."""
        return dataclasses.replace(location, fence=self.check)

    def check(self, renew: bool = False) -> None:
        """Raise LeaseLost unless this run still holds the output: renewing first (always with
        `renew`, as before publishing) when the last confirmed renewal is older than TTL/3, and
        giving up once it is older than TTL/2 (another run waits a whole TTL of silence before it
        takes over)."""
        if self.lost is None and (renew or time.monotonic() - self._confirmed > self.ttl / 3):
            try:
                self._renew_once()
            except StrataError as exc:
                silent = time.monotonic() - self._confirmed
                if self.lost is None and silent > self.ttl / 2:
                    self.lost = LeaseLost(
                        f"the lease on {self.location.uri()} could not be renewed for {silent:.0f} s "
                        f"({exc}); another run may take the output over after {self.holder.ttl:.0f} s, "
                        "so this run stops here and changes nothing more; committed fragments are kept")
        if self.lost is not None:
            raise self.lost

    def release(self) -> None:
        """Give the output back: the lease is marked released (its generation stays). Best effort:
        when the output cannot be written any more the lease simply runs out."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with self._lock:
            tag, self._tag = self._tag, None  # from now on nothing renews it
            if self.lost is not None or tag is None:
                return
            try:
                self.location.write_if(self._next(released=True).to_bytes(), LEASE_FILE, tag=tag)
            except Exception:  # noqa: BLE001 - see above
                pass

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _gone(self, other: Holder, tag: str | None, note: Callable[[str], None]) -> bool:
        if other.token == self.holder.token:
            return True
        if other.machine and other.machine == self.holder.machine:  # one clock, one pid space
            return not psutil.pid_exists(other.pid) or time.time() - other.renewed > other.ttl
        wait = min(max(self.ttl, other.ttl), MAX_TTL_S)
        note(f"strata: the output has a lease of {other.describe()}; checking for up to {wait:.0f} s "
             "whether that run is still alive")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(self.watch_every)
            found = self.location.read_tagged(LEASE_FILE)
            if found is None or found[1] != tag:  # renewed (alive), released or removed: decide again
                return found is None or bool((now := holder_of(found[0])) and now.released)
        return True

    def _take(self, tag: str | None, generation: int) -> bool:
        now = time.time()
        self.holder = dataclasses.replace(self.holder, generation=generation, renewed=now, beat=0, released=False)
        started, data = time.monotonic(), self.holder.to_bytes()
        try:
            self._tag = self.location.write_if(data, LEASE_FILE, tag=tag)
        except Conflict:
            found = self.location.read_tagged(LEASE_FILE)  # a write that landed but whose answer was lost
            if found is None or found[0] != data:
                return False
            self._tag = found[1]
        self._confirmed = started
        return True

    def _next(self, released: bool = False) -> Holder:
        return dataclasses.replace(self.holder, renewed=time.time(), beat=self.holder.beat + 1, released=released)

    def _renew_once(self) -> None:
        with self._lock:
            if self.lost is not None or self._tag is None:  # lost, or released
                return
            started, holder = time.monotonic(), self._next()
            try:
                self._tag = self.location.write_if(holder.to_bytes(), LEASE_FILE, tag=self._tag)
            except Conflict:
                found = self.location.read_tagged(LEASE_FILE)
                if found is None or found[0] != holder.to_bytes():
                    self.lost = taken_over(self.location, found[0] if found else None)
                    return
                self._tag = found[1]
            still = time.monotonic() - self._confirmed  # how long the lease may have looked unchanged
            self.holder, self._confirmed = holder, started
            if still > self.ttl / 2:  # a store this slow lets another run take the output at any moment
                self.lost = LeaseLost(
                    f"renewing the lease on {self.location.uri()} took {time.monotonic() - started:.0f} s, and it "
                    f"stood unrenewed for up to {still:.0f} s of run.lease_ttl {self.ttl:.0f} s: another run could "
                    "take the output over at any moment, so this run stops here and changes nothing more (committed "
                    "fragments are kept); raise run.lease_ttl for a store this slow or a driver this busy")

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                self._renew_once()
            except Exception:  # noqa: BLE001 - storage hiccup: `check` stops the run if it lasts
                continue
            if self.lost is not None:
                return

    def _read(self) -> Holder | None:
        return current_holder(self.location)


def taken_over(location: Location, data: bytes | None) -> LeaseLost:
    """The error of a run that finds its lease gone to another run (or removed)."""
    other = holder_of(data)
    who = f"another run ({other.describe()}, lease generation {other.generation})" if other else \
        "another process (the lease was removed or replaced)"
    return LeaseLost(f"output {location.uri()} was taken over by {who}; this run stops and changes nothing more "
                     "(its committed fragments stay for the run that holds the output now)")


def confirm_holder(location: Location, token: str) -> None:
    """For workers, before a journal or commit record: LeaseLost unless the output's lease still
    names the run `token` (one GET)."""
    found = location.read_tagged(LEASE_FILE)  # one GET (S3: no HEAD first)
    data = found[0] if found else None
    holder = holder_of(data)
    if holder is None or holder.token != token or holder.released:
        raise taken_over(location, data)


def surely_dead(holder: Holder) -> bool:
    """Whether a lease's run is certainly over, as far as this process can tell without watching:
    released, or held on this machine by a process that is gone or silent past its TTL (one
    clock). A holder on another machine needs watching (`Lease`): its stamps use its own clock."""
    if holder.released:
        return True
    if holder.machine and holder.machine == this_machine():
        return not psutil.pid_exists(holder.pid) or time.time() - holder.renewed > holder.ttl
    return False


def current_holder(location: Location) -> Holder | None:
    """Who holds the output's lease now, if anyone (a run that died may still hold it, for a while)."""
    holder = holder_of(location.read_optional(LEASE_FILE))
    return None if holder is None or holder.released else holder


def holder_of(data: bytes | None) -> Holder | None:
    """The holder a lease file's bytes name; None for no file, or one no run writes like that."""
    if data is None:
        return None
    try:
        return record_from(json.loads(data), Holder, ValueError)
    except (ValueError, TypeError, FileNotFoundError):  # just removed, or damaged: no live run writes it like that
        return None


def _generation_in(data: bytes | None) -> int:
    """The generation a lease file (even a damaged one) or run.json names (`manifest.generation_of`),
    so fencing tokens keep growing; 0 if the bytes are not JSON."""
    try:
        return generation_of(json.loads(data or b"null"))
    except (ValueError, UnicodeDecodeError):
        return 0
