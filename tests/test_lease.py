"""One run per output: the lease a run holds on its output (conditional writes, watched by this
host's clock, a generation that fences a run which lost it), and how a run tells a live holder
from a dead one."""

import dataclasses
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from pipeline.lease import LEASE_FILE, Lease, LeaseLost, OutputBusy, confirm_holder, current_holder, this_machine
from pipeline.manifest import CommitRecord, Manifest
from pipeline.storage import Location, StorageError

ROOT = Path(__file__).parents[1]


def location(tmp_path) -> Location:
    (tmp_path / "out" / "_manifest").mkdir(parents=True, exist_ok=True)
    return Location.from_uri(str(tmp_path / "out"))


def lease_of(tmp_path) -> dict:
    return json.loads((tmp_path / "out" / LEASE_FILE).read_text())


def plant(tmp_path, **fields) -> dict:
    """A lease as another run wrote it (by default on another machine, whose clock is its own)."""
    now = time.time()
    holder = {"token": uuid.uuid4().hex, "host": "another-host", "pid": 1, "started": now, "renewed": now,
              "generation": 1, "machine": "another-host/boot/1", "ttl": 60.0, "beat": 0, "released": False, **fields}
    location(tmp_path)
    (tmp_path / "out" / LEASE_FILE).write_text(json.dumps(holder))
    return holder


def renewing(tmp_path, stop: threading.Event, **fields) -> threading.Thread:
    """Another host's live run: it rewrites its lease every 0.1 s, its stamps by its own clock."""
    holder = plant(tmp_path, **{k: v for k, v in fields.items() if k != "skew"})

    def beat():
        while not stop.wait(0.1):
            holder["beat"] += 1
            holder["renewed"] = time.time() + fields.get("skew", 0)
            temp = tmp_path / "out" / "_manifest" / ".lease.tmp"  # written whole, as a run writes it
            temp.write_text(json.dumps(holder))
            temp.replace(tmp_path / "out" / LEASE_FILE)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    return thread


def elsewhere(lease: Lease, host: str) -> Lease:
    """A lease as a run on another machine takes it (its own clock and pids)."""
    lease.holder = dataclasses.replace(lease.holder, host=host, machine=f"{host}/boot/1")
    return lease


def hang(lease: Lease) -> None:
    """Stop a lease's renewals, as when its process stops (SIGSTOP) or loses the store for a while."""
    lease._stop.set()
    lease._renewer.join()


def test_held_while_the_run_lives_renewed_then_released_keeping_its_generation(tmp_path):
    with Lease(location(tmp_path), ttl=0.4) as lease:
        lease.acquire()
        first = lease_of(tmp_path)
        assert first["token"] == lease.token and first["generation"] == 1 and first["machine"] == this_machine()
        time.sleep(0.35)
        assert lease_of(tmp_path)["beat"] > first["beat"] and not lease_of(tmp_path)["released"]
    assert lease_of(tmp_path)["released"] and current_holder(location(tmp_path)) is None
    with Lease(location(tmp_path)) as after:
        started = time.monotonic()
        after.acquire()  # a released lease is free at once, and its generation goes on
        assert time.monotonic() - started < 1 and after.generation == 2 == lease_of(tmp_path)["generation"]


def test_a_live_process_of_this_machine_keeps_the_output_a_dead_one_does_not(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        plant(tmp_path, host="here", machine=this_machine(), pid=live.pid)
        with pytest.raises(OutputBusy, match=f"another run .process {live.pid} on here"):
            Lease(location(tmp_path)).acquire()
        plant(tmp_path, machine=this_machine(), pid=live.pid, renewed=time.time() - 120, generation=4)
        with Lease(location(tmp_path)) as lease:  # its process lives, but one clock says it stopped renewing
            lease.acquire()
            assert lease_of(tmp_path)["token"] == lease.token and lease.generation == 5
    finally:
        live.kill()
        live.wait()
    plant(tmp_path, machine=this_machine(), pid=live.pid)
    with Lease(location(tmp_path)) as lease:  # its process is gone: taken at once
        started = time.monotonic()
        lease.acquire()
        assert time.monotonic() - started < 1 and lease_of(tmp_path)["token"] == lease.token


@pytest.mark.parametrize("skew", [-700.0, 700.0, -86400.0])
def test_a_renewing_holder_on_another_host_keeps_the_output_whatever_its_clock_says(tmp_path, skew):
    """Split brain of the outside round: host B's clock 700 s ahead judged host A's live lease dead."""
    stop = threading.Event()
    renewing(tmp_path, stop, skew=skew)
    try:
        notes = []
        with pytest.raises(OutputBusy, match="another-host"):
            Lease(location(tmp_path), ttl=1, watch_every=0.05).acquire(note=notes.append)
        assert "checking for up to 60 s" in notes[0]  # the holder's TTL (60 s) rules, not the watcher's (1 s)
    finally:
        stop.set()


def test_a_silent_holder_on_another_host_is_taken_over_after_its_ttl_whatever_its_stamps(tmp_path):
    for renewed in (time.time(), time.time() - 3600, time.time() + 3600):  # stale-looking or not: watched
        plant(tmp_path, ttl=0.5, renewed=renewed, generation=7)
        with Lease(location(tmp_path), ttl=0.5, watch_every=0.05) as lease:
            started = time.monotonic()
            lease.acquire()
            assert 0.5 <= time.monotonic() - started < 3 and lease.generation == 8


@pytest.fixture
def s3_output(moto_endpoint, monkeypatch):
    import boto3

    from pipeline.config import StorageConfig

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    bucket = f"lease-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return lambda endpoint=moto_endpoint: Location.from_uri(f"s3://{bucket}/out", StorageConfig(endpoint_url=endpoint))


@pytest.mark.parametrize("store", ["local", "s3"])
def test_of_runs_starting_together_exactly_one_takes_the_output(tmp_path, store, request):
    """Conditional writes: create-if-absent and replace-if-unchanged, so two runs never both win."""
    make = request.getfixturevalue("s3_output") if store == "s3" else (lambda: location(tmp_path))
    for round_ in range(6):
        if round_ % 2:  # half the rounds race for a released lease (replace-if-unchanged), half for none
            plant(tmp_path, released=True) if store == "local" else make().write_bytes(
                json.dumps({**plant(tmp_path), "released": True}).encode(), LEASE_FILE)
        else:
            make().fs.rm(make().path(LEASE_FILE)) if make().exists(LEASE_FILE) else None
        leases = [Lease(make(), ttl=30) for _ in range(4)]
        results, gate = [], threading.Barrier(len(leases))

        def take(lease):
            gate.wait()
            try:
                lease.acquire()
                results.append(lease)
            except OutputBusy:
                pass

        threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(results) == 1, round_
        assert current_holder(make()).token == results[0].token
        results[0].release()


def test_a_run_whose_lease_was_taken_over_changes_nothing_more(tmp_path):
    out = location(tmp_path)
    mine = elsewhere(Lease(out, ttl=1.2, watch_every=0.05), "host-a")
    mine.acquire()
    hang(mine)  # this run hangs (a stopped process, a partition): it renews no more by itself
    fenced = mine.fenced(out)
    fenced.write_bytes(b"x", "data", "mine.parquet")
    other = Lease(out, ttl=1.2, watch_every=0.05)
    other.acquire()  # waited out a whole TTL of silence
    assert other.generation == mine.generation + 1
    with pytest.raises(LeaseLost, match="taken over by another run .process .* on [^h].* lease generation 2"):
        fenced.remove("data", "mine.parquet")  # the last renewal is old: it renews first, and finds it gone
    with pytest.raises(LeaseLost):
        fenced.write_bytes(b"late", "_manifest", "versions", "00000001.json")
    assert (tmp_path / "out" / "data" / "mine.parquet").read_bytes() == b"x"
    assert not (tmp_path / "out" / "_manifest" / "versions").exists()
    with pytest.raises(LeaseLost):
        confirm_holder(out, mine.token)  # what its workers check before journals and commits
    confirm_holder(out, other.token)
    mine.release()
    assert current_holder(out).token == other.token  # the loser never touches the winner's lease
    other.release()


def test_a_run_that_cannot_renew_for_half_its_ttl_stops_before_another_could_take_over(s3_output, moto_endpoint):
    from flaky_proxy import Fault, FlakyProxy

    denied = Fault(403, "application/xml", b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>")
    mine = Lease(s3_output(), ttl=9)
    mine.acquire()
    acquired = time.monotonic()
    hang(mine)
    path = "/" + s3_output().path(LEASE_FILE)
    with FlakyProxy(moto_endpoint, fail_every=1, only=("PUT", path), fault=denied) as proxy:
        from pipeline.config import StorageConfig

        broken = Location.from_uri(s3_output().uri(), StorageConfig(endpoint_url=proxy.url, retries=0))
        mine.location = broken
        fenced = mine.fenced(broken)
        time.sleep(acquired + 3.6 - time.monotonic())  # past TTL/3: a write renews first; that fails, but
        fenced.write_bytes(b"ok", "data", "a.parquet")  # the lease is not at risk yet
        time.sleep(acquired + 5.2 - time.monotonic())  # past TTL/2 without a renewal: another run may take over
        with pytest.raises(LeaseLost, match=r"could not be renewed for \d s .*Access Denied.*changes nothing more"):
            fenced.write_bytes(b"late", "data", "b.parquet")
        assert proxy.failed >= 2
    assert not s3_output().exists("data", "b.parquet")


def test_a_run_whose_renewals_are_too_slow_for_its_ttl_stops_and_says_to_raise_it(s3_output, moto_endpoint):
    """Lease PUTs that take longer than the TTL allows leave the lease unchanged long enough for
    another run to take over: the holder stops at once instead of committing on (outside round)."""
    from flaky_proxy import FlakyProxy

    from pipeline.config import StorageConfig

    path = "/" + s3_output().path(LEASE_FILE)
    with FlakyProxy(moto_endpoint, delay=2.5, only=("PUT", path)) as slow:
        mine = Lease(Location.from_uri(s3_output().uri(), StorageConfig(endpoint_url=slow.url)), ttl=3)
        mine.acquire()
        deadline = time.monotonic() + 20
        while mine.lost is None and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(LeaseLost, match=r"renewing the lease on s3://.* took 3 s, and it stood unrenewed for up "
                                            r"to \d+ s of run.lease_ttl 3 s: .*raise run.lease_ttl"):
            mine.fenced(s3_output()).write_bytes(b"late", "data", "x.parquet")
        mine.release()
    assert not s3_output().exists("data", "x.parquet")


@pytest.mark.parametrize("lease", ["{garbage", None, '{"generation": -5}'])
def test_the_fencing_token_never_goes_back(tmp_path, lease):
    """A lease file damaged, removed or set back by hand: run.json still says which generation ran last."""
    out = location(tmp_path)
    (tmp_path / "out" / "_manifest" / "run.json").write_text(json.dumps({"lease_generation": 7}))
    if lease is not None:
        (tmp_path / "out" / LEASE_FILE).write_text(lease)
    with Lease(out) as taken:
        taken.acquire()
        assert taken.generation == 8


def test_a_stop_that_lands_in_a_finalizer_prints_no_traceback(capsys):
    """SIGTERM raised inside a weakref callback printed "Exception ignored ... Traceback": the run
    loop raises the stop again, so the CLI says nothing there; other unraisable errors still show."""
    from pipeline.cli import _quiet_stops
    from pipeline.errors import Terminated

    class Finalized:
        def __init__(self, exc):
            self.exc = exc

        def __del__(self):
            raise self.exc

    before, sys.unraisablehook = sys.unraisablehook, _quiet_stops
    try:
        Finalized(Terminated())  # dropped at once: its __del__ raises where nothing can catch it
        Finalized(KeyboardInterrupt())
        assert capsys.readouterr().err == ""
        Finalized(ValueError("a real one"))
    finally:
        sys.unraisablehook = before
    assert "a real one" in capsys.readouterr().err


def test_files_a_newer_lease_generation_journals_are_never_removed(tmp_path):
    out = location(tmp_path)
    newer, older = Manifest(out, generation=3), Manifest(out, generation=2)
    newer.begin_writing("f1", ["data/f1.parquet"])
    out.write_bytes(b"new", "data", "f1.parquet")
    assert older.remove_unfinished() == [] and out.exists("data", "f1.parquet")
    record = CommitRecord("f1", "s", 0, 1, ["data/f1.parquet"], 1, 1, 0, 0, 1, 1, 0.1)
    assert older.remove_fragments([record]) == 0 and out.exists("data", "f1.parquet")
    assert newer.remove_unfinished() == ["data/f1.parquet"]  # its own run's leftovers are its to remove


def test_scheduled_entrypoint_skips_a_tick_while_another_run_holds_the_output(tmp_path):
    from conftest import CORPUS, write_config

    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", input={"uri": str(CORPUS)}, output={"uri": str(out)})
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        plant(tmp_path, host="here", machine=this_machine(), pid=live.pid)
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
                                     '{"token": "t", "ho', "[]", '{"generation": 41, "x": 1}'])
def test_a_damaged_lease_is_taken_over_with_a_note(tmp_path, content):
    location = Location.from_uri(str(tmp_path))
    (tmp_path / "_manifest").mkdir()
    (tmp_path / "_manifest" / "lease.json").write_text(content)
    notes = []
    lease = Lease(location)
    lease.acquire(note=notes.append)
    try:
        assert current_holder(location).token == lease.token
        assert len(notes) == 1 and "lease.json is damaged" in notes[0]
        assert lease.generation == (42 if "41" in content else 1)  # fencing tokens never go back
    finally:
        lease.release()


def _status(tmp_path) -> dict:
    (tmp_path / "out" / "_manifest" / "run.json").write_text(json.dumps(
        {"fingerprint": "f", "identity": {}, "model": {"name": "m"}, "plan": {"fragments": None, "rows": None}}))
    status = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(tmp_path / "out"), "--json"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    return json.loads(status.stdout)


def test_status_names_a_lease_whose_run_is_over_as_stale_not_running(tmp_path):
    """A run killed with -9 leaves its lease; its process is gone, so status must not call it running."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    plant(tmp_path, host="here", machine=this_machine(), pid=dead.pid)
    report = _status(tmp_path)
    assert report["running"] is None and f"process {dead.pid} on here" in report["stale_lease"], report
    assert report["fragments_planned"] is None and report["fragments_pending"] is None
    plant(tmp_path, renewed=time.time() + 700)  # another host, its clock 700 s ahead: its own stamp, said so
    report = _status(tmp_path)
    assert report["stale_lease"] is None and "by that host's clock" in report["running"], report


def test_storage_errors_while_taking_a_lease_are_one_line(tmp_path):
    (tmp_path / "out").write_text("a file where the output folder should be")
    with pytest.raises(StorageError, match="cannot (read|write)"):
        Lease(Location.from_uri(str(tmp_path / "out"))).acquire()


def test_two_hosts_with_skewed_clocks_on_a_slow_store_never_share_an_output(tmp_path, s3_output, moto_endpoint):
    """The outside round's split brain, end to end: host A writes an s3:// output through a slow
    store; host B, its clock 700 s ahead, must not take it while A renews. Once A stops (SIGSTOP:
    alive, but silent) B takes over after the TTL and publishes; A, resumed, finds its lease gone,
    changes nothing more and says so in one line. Version 1 is whole: every file it lists exists,
    every input row is in it exactly once."""
    import os
    import signal

    import pyarrow.parquet as pq
    from flaky_proxy import FlakyProxy

    from conftest import passages, write_config, write_jsonl

    out = s3_output()
    (tmp_path / "in").mkdir()
    corpus = write_jsonl(tmp_path / "in" / "part-0.jsonl", passages()[:60])

    def config(name, endpoint):
        return write_config(tmp_path / f"{name}.yaml", input={"uri": str(corpus.parent)}, model={"max_length": 32},
                            outputs=[{"name": "v", "layers": [-1], "pooling": "mean"}],
                            batching={"fragment_docs": 5}, output={"uri": out.uri()},
                            storage={"endpoint_url": endpoint}, run={"lease_ttl": 10})

    def as_host(host, skew, cfg, **kwargs):
        return subprocess.Popen([sys.executable, str(ROOT / "tests" / "as_host.py"), host, str(skew), "run", str(cfg)],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs)

    with FlakyProxy(moto_endpoint, delay=1.5, delay_every=3) as slow:  # every 3rd request waits 1.5 s
        a = as_host("host-a", 0, config("a", slow.url), start_new_session=True)
        try:
            def wait_for(found):
                deadline = time.monotonic() + 120
                while not found() and time.monotonic() < deadline:
                    assert a.poll() is None, a.stderr.read()
                    time.sleep(0.2)

            wait_for(lambda: out.exists(LEASE_FILE))
            b = as_host("host-b", 700, config("b", moto_endpoint))  # B tries while A starts up, and A commits
            wait_for(lambda: out.list_names("_manifest", "fragments"))
            _, b_err = b.communicate(timeout=120)
            assert b.returncode == 1 and "being written by another run (process" in b_err and "on host-a" in b_err, b_err
            assert a.poll() is None, "A finished before B tried: give A more work"
            os.kill(a.pid, signal.SIGSTOP)  # A: alive but silent (a hung driver, a partition)
            b = as_host("host-b", 700, config("b", moto_endpoint))
            _, b_err = b.communicate(timeout=240)
            assert b.returncode == 0, b_err
            assert "published version 1" in b_err
        finally:
            if a.poll() is None:
                os.kill(a.pid, signal.SIGCONT)
        _, a_err = a.communicate(timeout=120)
    last = a_err.strip().splitlines()[-1]
    assert a.returncode == 1 and last.startswith(f"error: output {out.uri()} was taken over by another run"), a_err
    assert "on host-b" in last and "lease generation 2" in last and "Traceback" not in a_err
    snapshot = json.loads(out.read_bytes("_manifest", "versions", "00000001.json"))
    assert snapshot["lease_generation"] == 2
    for record in snapshot["fragments"]:  # each file names the generation that wrote it: a late request of
        assert record["lease_generation"] in (1, 2)  # A's (a delete in flight) can never hit one of B's files
        assert all(f.endswith(f"-g{record['lease_generation']}.parquet") for f in record["files"])
        assert record["hash_file"].endswith(f"-g{record['lease_generation']}.parquet")
    rows = []
    for path in snapshot["files"]:  # every file version 1 lists is there, whole
        with out.fs.open(out.path(path), "rb") as f:
            rows += pq.read_table(f, columns=["source", "row"]).to_pylist()
    assert len(rows) == len({(r["source"], r["row"]) for r in rows}) == snapshot["counts"]["docs"]
    counts = snapshot["counts"]
    assert counts["docs"] + counts["quarantined"] + counts["blank"] == counts["rows"] == 60
    assert current_holder(out) is None  # B released it; A never touched it


def test_only_older_generations_files_of_this_versions_fragments_are_superseded():
    """Names prove authorship: this version's fragment ids, an older generation, not in its record."""
    from pipeline.runner import superseded

    fid = "s0.jsonl-000000010-65e791c2d5b1"
    record = CommitRecord(fid, "s0.jsonl", 10, 15, [f"data/source=s0.jsonl/{fid}-g3.parquet"], 5, 5, 0, 0, 9, 9, 0.1,
                          lease_generation=3, hash_file=f"_manifest/hashes/{fid}-g3.parquet")
    present = {f"data/source=s0.jsonl/{fid}-g3.parquet", f"_manifest/hashes/{fid}-g3.parquet",  # its own
               f"data/source=s0.jsonl/{fid}.parquet", f"_manifest/hashes/{fid}.parquet",  # before generations
               f"data/source=s0.jsonl/{fid}-g2-0badc0de.parquet", f"quarantine/{fid}-g1.parquet",  # older runs'
               f"data/source=s0.jsonl/{fid}-g4.parquet",  # a newer generation's: never
               "data/source=s0.jsonl/s0.jsonl-000000010-0123456789ab-g1.parquet",  # another version's fragment
               "data/notes.parquet", "_manifest/index/00000000000000000001-0badc0de.parquet"}
    assert superseded(present, [record], 3) == sorted([
        f"data/source=s0.jsonl/{fid}.parquet", f"_manifest/hashes/{fid}.parquet",
        f"data/source=s0.jsonl/{fid}-g2-0badc0de.parquet", f"quarantine/{fid}-g1.parquet"])
