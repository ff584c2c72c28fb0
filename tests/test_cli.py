"""The command line as a user meets it: exit codes, one-line errors, no tracebacks."""

import gzip
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import CORPUS, cli, write_config


def strata(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def base(tmp_path: Path, **changes) -> dict:
    raw = {"input": {"uri": str(CORPUS)}, "output": {"uri": str(tmp_path / "out")}}
    raw.update(changes)
    return raw


def test_unknown_key(tmp_path):
    path = write_config(tmp_path / "c.yaml", **base(tmp_path, batching={"token_budgett": 5}))
    assert_one_line_error(strata("run", str(path)), "unknown key 'batching.token_budgett'")


def test_missing_input(tmp_path):
    path = write_config(tmp_path / "c.yaml", **base(tmp_path, input={"uri": str(tmp_path / "nowhere")}))
    assert_one_line_error(strata("run", str(path)), "nowhere", "does not exist")


def test_layer_beyond_depth(tmp_path):
    path = write_config(tmp_path / "c.yaml", **base(tmp_path, outputs=[{"name": "v", "layers": [12]}]))
    assert_one_line_error(strata("run", str(path)), "layer 12 is beyond the model's depth", "6 layers")


def test_stride_that_does_not_fit_a_window(tmp_path):
    path = write_config(tmp_path / "c.yaml", **base(tmp_path, long_text={"strategy": "sliding_window"}))
    assert_one_line_error(strata("validate", str(path)), "long_text.stride 256 must be smaller", "254 tokens")


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    path = write_config(tmp_path / "c.yaml", **base(tmp_path, output={"uri": str(blocker / "out")}))
    assert_one_line_error(strata("run", str(path)), "is not writable", str(blocker))


def test_missing_config_file_and_bad_override(tmp_path):
    assert_one_line_error(strata("validate", str(tmp_path / "none.yaml")), "cannot read config")
    path = write_config(tmp_path / "c.yaml", **base(tmp_path))
    assert_one_line_error(strata("validate", str(path), "--set", "model.dtype=int4"), "model.dtype")


def test_status_of_a_folder_without_a_run(tmp_path):
    assert_one_line_error(strata("status", str(tmp_path)), "holds no strata run")


def test_validate_prints_the_resolved_config(tmp_path):
    path = write_config(tmp_path / "c.yaml", **base(tmp_path))
    result = strata("validate", str(path), "--set", "batching.fragment_docs=100")
    assert result.returncode == 0, result.stderr
    assert "fragment_docs: 100" in result.stdout and "token_budget: 16384" in result.stdout
    assert "2 shards, 300 rows;" in result.stderr
    assert "model default (BertModel, 6 layers, hidden 384, max_length 256)" in result.stderr


def test_run_then_status(tmp_path):
    path = write_config(tmp_path / "c.yaml", **base(tmp_path, input={"uri": str(CORPUS / "part-0.jsonl")},
                                                    model={"max_length": 32}, batching={"fragment_docs": 50}))
    result = strata("run", str(path))
    assert result.returncode == 0, result.stderr
    assert "strata run summary" in result.stderr and "documents embedded" in result.stderr
    status = strata("status", str(tmp_path / "out"), "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["fragments_committed"] == report["fragments_planned"] == 3
    assert report["docs"] == 150 and report["fragments_pending"] == 0
    assert report["running"] is None  # the run gave its lease back
    table = strata("status", str(tmp_path / "out"))
    assert "fragments_committed" in table.stdout and "150" in table.stdout


# --- every path through main ends in its own exit code and at most one line ---

def _wait_for_commits(out: Path, count: int, then) -> threading.Thread:
    def watch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if len(list((out / "_manifest" / "fragments").glob("*.json"))) >= count:
                return then()
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "interrupted"),
                                                 (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_a_stopped_run_exits_with_its_signals_code_and_gives_the_output_back(ray_cluster, capsys, tmp_path, signum,
                                                                              code, said):
    path = write_config(tmp_path / "c.yaml", **base(tmp_path, input={"uri": str(CORPUS / "part-0.jsonl")},
                                                    model={"max_length": 32}, batching={"fragment_docs": 5}))
    watcher = _wait_for_commits(tmp_path / "out", 1, lambda: os.kill(os.getpid(), signum))
    try:
        returned, _, stderr = cli(capsys, "run", str(path))
    finally:
        watcher.join()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # main installed its handler in this process
    assert returned == code, stderr
    assert stderr.strip().splitlines()[-1].startswith(said) and "Traceback" not in stderr
    assert json.loads((tmp_path / "out" / "_manifest" / "lease.json").read_text())["released"]
    resumed, _, stderr = cli(capsys, "run", str(path))
    assert resumed == 0, stderr


def test_validate_reports_an_unreadable_shard_and_a_model_that_cannot_load(capsys, tmp_path, model_info):
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "ok.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    (corpus / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:40])
    path = write_config(tmp_path / "c.yaml", **base(tmp_path, input={"uri": str(corpus)}))
    code, _, stderr = cli(capsys, "validate", str(path))
    assert code == 1 and stderr.count("\n") == 1 and "error: 1 shard cannot be read (cut.jsonl.gz: " in stderr

    model = tmp_path / "model"
    shutil.copytree(model_info.path, model)
    torch_bin = model / "pytorch_model.bin"
    (model / "model.safetensors").unlink()
    torch_bin.write_bytes(pickle.dumps({"not": "torch"}))
    path = write_config(tmp_path / "c.yaml", **base(tmp_path, input={"uri": str(corpus / "ok.jsonl")},
                                                    model={"name_or_path": str(model)}))
    code, _, stderr = cli(capsys, "validate", str(path))
    assert code == 1 and stderr.count("\n") == 1 and stderr.startswith(
        f"error: cannot load the weights of {model}: pytorch_model.bin"), stderr


@pytest.mark.parametrize("damage", [
    lambda m: (m / "run.json").write_text('{"fingerprint": "ab", "iden'),
    lambda m: (m / "run.json").write_text("[1, 2]"),
    lambda m: (m / "fragments" / "f.json").write_text('{"fragment": "f", "source": 1}'),
    lambda m: (m / "versions" / "00000001.json").write_text('{"version": "one"}'),
])
def test_status_and_gc_of_a_damaged_manifest_say_which_file_in_one_line(capsys, tmp_path, damage):
    manifest = tmp_path / "out" / "_manifest"
    for folder in ("fragments", "versions"):
        (manifest / folder).mkdir(parents=True)
    (manifest / "run.json").write_text(json.dumps({"fingerprint": "ab", "identity": {}, "model": {"name": "m"},
                                                   "plan": {"fragments": 1, "rows": 2}}))
    damage(manifest)
    code, _, stderr = cli(capsys, "status", str(tmp_path / "out"))
    assert code == 1 and stderr.count("\n") == 1 and " is damaged: " in stderr and str(manifest) in stderr, stderr
    code, _, stderr = cli(capsys, "gc", str(tmp_path / "out"), "--keep", "1")  # reads the snapshots only
    assert code == 1 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr


def test_status_of_object_storage_without_credentials_is_one_line(capsys, monkeypatch):
    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec keys its cache on options, not on these variables
    try:
        code, _, stderr = cli(capsys, "status", "s3://nobucket/x")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert code == 1 and stderr.count("\n") == 1
    assert stderr.startswith("error: cannot read s3://nobucket/x/_manifest/run.json: NoCredentialsError")


def test_a_dead_local_cluster_left_behind_does_not_stop_runs(tmp_path):
    """`ray start --head` killed: its address file stays. strata starts its own Ray, as asked."""
    address_file = Path("/tmp/ray/ray_current_cluster")
    saved = address_file.read_bytes() if address_file.exists() else None
    address_file.parent.mkdir(parents=True, exist_ok=True)
    address_file.write_text("127.0.0.1:1\n")  # nobody listens there
    try:
        path = write_config(tmp_path / "c.yaml", **base(tmp_path, input={"uri": str(CORPUS / "part-0.jsonl")},
                                                        model={"max_length": 16}))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path)], capture_output=True,
                                text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        env["RAY_ADDRESS"] = "127.0.0.1:1"  # asked to join a cluster that is not there: one line, at once
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path), "--set",
                                 f"output.uri={tmp_path / 'out2'}"], capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(
            "error: cannot connect to the Ray cluster at 127.0.0.1:1 (from RAY_ADDRESS)"), result.stderr
    finally:
        if saved is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_bytes(saved)


@pytest.mark.parametrize("uri, said", [("gs://b/x", "ImportError: Please install gcsfs"),
                                       ("memory://x", "lives only inside one process")])
def test_a_location_strata_cannot_open_is_one_line(capsys, uri, said):
    for args in (("status", uri), ("gc", uri, "--keep", "1")):
        code, _, stderr = cli(capsys, *args)
        assert code == 1 and stderr.count("\n") == 1 and said in stderr, (args, stderr)


def test_usage_mistakes_print_usage_not_a_traceback(capsys):
    for args in (("run",), ("gc", "x", "--keep", "0"), ("frob",), ("search", "db", "q", "-k", "0")):
        code, _, stderr = cli(capsys, *args)
        assert code == 2 and "Traceback" not in stderr and "Error: " in stderr, (args, stderr)


def test_a_standard_output_that_cannot_be_written_is_one_line(tmp_path):
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(tmp_path / "none.yaml")],
                                stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert_one_line_error(result, "cannot read config")  # the error goes to stderr as always
    path = write_config(tmp_path / "c.yaml", **base(tmp_path))
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(path)], stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=300)
    assert_one_line_error(result, "cannot write to standard output: No space left on device")


def test_a_stop_that_a_library_swallows_still_stops_the_run():
    """A Ctrl-C (or SIGTERM) raises where it lands; if a library swallows it there, the run loop
    still sees it between fragments (errors.raise_if_stopped)."""
    from pipeline import errors
    from pipeline.errors import Terminated

    errors.clear_stops()
    errors.raise_if_stopped()  # nothing asked: nothing raised
    for kind in (KeyboardInterrupt, Terminated):
        try:
            errors.stop(kind)  # what the signal handler does
        except BaseException:  # noqa: BLE001 - the library that swallows it
            pass
        with pytest.raises(kind):
            errors.raise_if_stopped()
        errors.clear_stops()
    errors.raise_if_stopped()


def test_connection_resets_inside_the_storage_event_loop_print_no_tracebacks(tmp_path):
    """s3fs runs aiohttp on an event loop of its own; a connection reset in a task nobody awaits
    is logged by asyncio as "Task exception was never retrieved" with a traceback (five of them
    when the store was down for 20 s). strata retries or reports the request itself."""
    script = f"""
import asyncio, gc, sys
from pipeline.cli import main
sys.argv = ["strata", "status", {str(tmp_path / "nothing")!r}]
try:
    main()
except SystemExit:
    pass

async def reset():
    raise ConnectionResetError("Connection reset by peer")

async def leave_a_task_unretrieved():
    asyncio.get_running_loop().create_task(reset())
    await asyncio.sleep(0.05)

asyncio.run(leave_a_task_unretrieved())
gc.collect()
sys.exit(1)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "holds no strata run")  # the status line, and nothing after it
    assert "Task exception was never retrieved" not in result.stderr and "Traceback" not in result.stderr
