"""One run per output: the lease a run holds on its output, and how a run tells a live holder from a dead one."""

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.lease import LEASE_FILE, Lease, OutputBusy, current_holder
from pipeline.storage import Location

ROOT = Path(__file__).parents[1]


def location(tmp_path) -> Location:
    (tmp_path / "out" / "_manifest").mkdir(parents=True, exist_ok=True)
    return Location.from_uri(str(tmp_path / "out"))


def holder_of(tmp_path) -> dict:
    return json.loads((tmp_path / "out" / LEASE_FILE).read_text())


def other_host(lease: Lease, **changes) -> Lease:
    lease.holder = dataclasses.replace(lease.holder, host="another-host", **changes)
    return lease


def test_held_while_the_run_lives_renewed_and_removed_after(tmp_path):
    with Lease(location(tmp_path), renew_every=0.05) as lease:
        lease.acquire()
        first = holder_of(tmp_path)
        assert first["token"] == lease.holder.token and first["pid"] > 0
        time.sleep(0.3)
        assert holder_of(tmp_path)["renewed"] > first["renewed"]
    assert not (tmp_path / "out" / LEASE_FILE).exists()


def test_a_live_process_of_this_host_keeps_the_output(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = Lease(location(tmp_path))
        holder.holder = dataclasses.replace(holder.holder, pid=live.pid)
        holder._write(time.time())
        with pytest.raises(OutputBusy, match=f"another run .process {live.pid} on "):
            Lease(location(tmp_path)).acquire()
        holder._write(time.time() - 120)  # its process lives, but it stopped renewing: a reused pid
        with Lease(location(tmp_path)) as lease:
            lease.acquire()
            assert holder_of(tmp_path)["token"] == lease.holder.token
        holder._write(time.time())
    finally:
        live.kill()
        live.wait()
    with Lease(location(tmp_path)) as lease:  # its process is gone: taken at once
        started = time.monotonic()
        lease.acquire()
        assert time.monotonic() - started < 1 and holder_of(tmp_path)["token"] == lease.holder.token


def test_a_holder_on_another_host_is_alive_while_it_renews(tmp_path):
    with other_host(Lease(location(tmp_path), renew_every=0.05)) as remote:
        remote.acquire()
        notes = []
        with pytest.raises(OutputBusy, match="another-host"):
            Lease(location(tmp_path), ttl=1, watch_every=0.1).acquire(note=notes.append)
        assert "checking for up to 1 s whether that run is still alive" in notes[0]


def test_a_silent_holder_on_another_host_is_taken_over_after_the_ttl(tmp_path):
    remote = other_host(Lease(location(tmp_path)))
    remote._write(time.time())  # wrote once, then died without a word
    with Lease(location(tmp_path), ttl=0.5, watch_every=0.1) as lease:
        started = time.monotonic()
        lease.acquire()
        assert 0.5 <= time.monotonic() - started < 3
    stale = other_host(Lease(location(tmp_path)))
    stale._write(time.time() - 3600)  # an hour old: no need to watch it
    with Lease(location(tmp_path), ttl=30) as lease:
        started = time.monotonic()
        lease.acquire()
        assert time.monotonic() - started < 1


def test_scheduled_entrypoint_skips_a_tick_while_another_run_holds_the_output(tmp_path):
    from conftest import CORPUS, write_config

    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", input={"uri": str(CORPUS)}, output={"uri": str(out)})
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "_manifest").mkdir(parents=True)
        holder = Lease(Location.from_uri(str(out)))
        holder.holder = dataclasses.replace(holder.holder, pid=live.pid)
        holder._write(time.time())
        tick = subprocess.run([sys.executable, str(ROOT / "jobs" / "scheduled.py"), str(config)],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert tick.returncode == 0, tick.stderr
        assert f"skipping this run: output {out} is being written by another run (process {live.pid}" in tick.stderr
        assert not (out / "data").exists()
        plain = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config)],
                               capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert plain.returncode == 1 and plain.stderr.startswith("error: output") and "stop it first" in plain.stderr
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("content", ['{"token": "t", "host": "h", "pid": 1, "started": 1.0, "renewed": "soon"}',
                                     '{"token": "t", "ho', "[]"])
def test_a_damaged_lease_is_taken_over_with_a_note(tmp_path, content):
    location = Location.from_uri(str(tmp_path))
    (tmp_path / "_manifest").mkdir()
    (tmp_path / "_manifest" / "lease.json").write_text(content)
    notes = []
    lease = Lease(location)
    lease.acquire(note=notes.append)
    try:
        assert current_holder(location).token == lease.holder.token
        assert len(notes) == 1 and "lease.json is damaged" in notes[0]
    finally:
        lease.release()


def test_status_names_a_lease_whose_run_is_over_as_stale_not_running(tmp_path):
    """A run killed with -9 leaves its lease; its process is gone, so status must not call it running."""
    from pipeline.cli import app  # noqa: F401 - the command under test, through its entry point below

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lease = Lease(location(tmp_path))
    lease.holder = dataclasses.replace(lease.holder, pid=dead.pid)
    lease._write(time.time())
    (tmp_path / "out" / "_manifest" / "run.json").write_text(json.dumps(
        {"fingerprint": "f", "identity": {}, "model": {"name": "m"}, "plan": {"fragments": None, "rows": None}}))
    status = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(tmp_path / "out"), "--json"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    report = json.loads(status.stdout)
    assert report["running"] is None and f"process {dead.pid} on " in report["stale_lease"], report
    assert report["fragments_planned"] is None and report["fragments_pending"] is None
