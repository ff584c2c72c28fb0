"""strata as Ray jobs on a real cluster: a `ray start --head` with its job server on 127.0.0.1.

The head runs in its own temp dir, so the other tests' `ray.init()` never joins it, and in its
own process group, so tearing it down leaves the session's Ray instance alone.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.dataset as ds
import pytest

from conftest import CORPUS, cli, write_config
from flaky_proxy import NO_AGENT, FlakyProxy
from test_cli import assert_one_line_error, strata

CORPUS_ROWS = 300
HEAD_START_TIMEOUT_S = 90


@dataclass(frozen=True)
class Head:
    address: str
    metrics_url: str
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    temp = tempfile.mkdtemp(prefix="strata-head-", dir="/tmp")  # Ray's socket paths must stay short
    bin_dir = os.path.dirname(sys.executable)
    dashboard, metrics = _free_port(), _free_port()
    ports = {flag: _free_port() for flag in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "runtime-env-agent-port", "ray-client-server-port",
                                             "node-manager-port", "object-manager-port")}
    log = Path(temp) / "head.log"
    head = subprocess.Popen(
        [os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--metrics-export-port={metrics}", "--num-cpus=2", "--object-store-memory=268435456",
         f"--temp-dir={temp}", "--disable-usage-stats", *(f"--{flag}={port}" for flag, port in ports.items())],
        # started as .venv/bin/ray without the venv on PATH: the job finds the workers' Python itself
        env={**os.environ, "PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != bin_dir)},
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_job_server(address, head, log)
        yield Head(address, f"http://127.0.0.1:{metrics}/metrics", log)
    finally:
        _stop_head(head, temp)


def _wait_for_job_server(address: str, head: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start --head exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                return
        except OSError as exc:
            if "401" in str(exc) or "403" in str(exc):  # answers, wants a token: strata handles that
                return
            time.sleep(0.5)
    pytest.fail(f"the job server at {address} did not come up in {HEAD_START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def _stop_head(head: subprocess.Popen, temp: str) -> None:
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):  # a throwaway head: no need to drain
        try:
            os.killpg(head.pid, sig)
            head.wait(wait)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    for process in psutil.process_iter(["cmdline"]):  # a job's driver runs in a session of its own
        if any(temp in part for part in process.info["cmdline"] or []):
            process.kill()
    shutil.rmtree(temp, ignore_errors=True)


def _config(tmp_path: Path, output: Path, fragment_docs: int = 64) -> Path:
    return write_config(tmp_path / "job.yaml", input={"uri": str(CORPUS)}, output={"uri": str(output)},
                        model={"max_length": 64}, outputs=[{"name": "sentence", "layers": [-1], "pooling": "mean", "normalize": True}],
                        batching={"fragment_docs": fragment_docs})


def _ids(output: Path) -> list[str]:
    return ds.dataset(output / "data", partitioning="hive").to_table(columns=["id"]).column("id").to_pylist()


def _vectors(output: Path) -> dict[str, list[float]]:
    table = ds.dataset(output / "data", partitioning="hive").to_table(columns=["id", "sentence"])
    return dict(zip(table.column("id").to_pylist(), table.column("sentence").to_pylist()))


def _input_ids() -> set[str]:
    import gzip

    ids = set()
    for path in sorted(CORPUS.iterdir()):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as lines:
            ids |= {json.loads(line)["id"] for line in lines if line.strip()}
    return ids


def _jobs(head: Head) -> dict[str, dict]:
    # --address wins over Ray's address variables (Ray's own client lets them override it)
    listed = subprocess.run([sys.executable, "-m", "pipeline.cli", "jobs", "list", "--address", head.address, "--json"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "RAY_ADDRESS": "http://127.0.0.1:1"})
    assert listed.returncode == 0, listed.stderr
    return {job["job_id"]: job for job in json.loads(listed.stdout)}


def _metric(head: Head, name: str, output: Path) -> float | None:
    with urllib.request.urlopen(head.metrics_url, timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and f'output="{output}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_submit_waits_for_a_starting_head_runs_the_config_as_a_job_and_exports_metrics(ray_head, tmp_path):
    output = tmp_path / "out"
    # a head whose job agent is not up yet: "No available agent" twice, the second time after it
    # took the job (the answer lost on the way), so the third try finds the job already there
    proxy = FlakyProxy(ray_head.address, fault=NO_AGENT, script=("fail", "lose"), only=("POST", "/api/jobs/"))
    try:
        submitted = strata("submit", str(_config(tmp_path, output)), "--address", proxy.url)
    finally:
        proxy.stop()
    assert submitted.returncode == 0, submitted.stderr
    assert (proxy.seen, proxy.failed) == (3, 2)
    job_id = submitted.stdout.strip()
    assert job_id.startswith("strata-job-")

    result = strata("jobs", "logs", job_id, "--follow", "--address", ray_head.address)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "strata run summary" in result.stdout  # the job's own log, streamed
    assert f"job {job_id} succeeded" in result.stderr

    ids = _ids(output)
    assert len(ids) == CORPUS_ROWS and set(ids) == _input_ids()
    jobs = _jobs(ray_head)
    assert [job_id] == [other for other, job in jobs.items() if job["output"] == str(output)]  # submitted once
    job = jobs[job_id]
    assert job["status"] == "SUCCEEDED" and job["output"] == str(output) and job["config"] == "job"
    shown = strata("jobs", "show", job_id, "--address", ray_head.address)
    assert json.loads(shown.stdout)["entrypoint"] == "sh strata-job.sh"
    assert job_id in strata("jobs", "list", "--address", ray_head.address).stdout  # the table keeps ids whole
    for command in ("show", "logs", "stop"):
        assert_one_line_error(strata("jobs", command, "strata-no-such-job", "--address", ray_head.address),
                              "no job strata-no-such-job on")

    # the driver's progress reached Ray's Prometheus endpoint, tagged with the output
    deadline = time.monotonic() + 30
    while _metric(ray_head, "ray_strata_docs_total", output) != CORPUS_ROWS and time.monotonic() < deadline:
        time.sleep(1)
    assert _metric(ray_head, "ray_strata_docs_total", output) == CORPUS_ROWS
    assert _metric(ray_head, "ray_strata_tokens_total", output) == json.loads(
        (output / "_manifest" / "run.json").read_text())["summary"]["tokens"]
    assert _metric(ray_head, "ray_strata_bytes_remaining", output) == 0


def test_stopped_job_resubmitted_finishes_exactly_once(ray_head, tmp_path):
    output = tmp_path / "out"
    config = _config(tmp_path, output, fragment_docs=10)  # 30 fragments: a stop lands mid-run
    first = strata("submit", str(config), "--address", ray_head.address, "--ship-code")
    assert first.returncode == 0, first.stderr
    job_id = first.stdout.strip()
    commits = output / "_manifest" / "fragments"
    deadline = time.monotonic() + 120
    while len(list(commits.glob("*.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(commits.glob("*.json")), "the first job committed nothing in 120 s"

    running = json.loads(strata("status", str(output), "--json").stdout)["running"]
    assert running.startswith("process ") and "lease renewed" in running  # the job's driver holds the output
    # a second job on the same output while the first runs would redo its fragments: refused
    assert_one_line_error(strata("submit", str(config), "--address", ray_head.address), job_id, "stop it first")

    stopped = strata("jobs", "stop", job_id, "--address", ray_head.address)
    assert stopped.returncode == 0 and "stopped" in stopped.stderr, stopped.stderr
    assert _jobs(ray_head)[job_id]["status"] == "STOPPED"
    done_before = len(list(commits.glob("*.json")))
    assert 0 < done_before < 30

    again = strata("submit", str(config), "--address", ray_head.address, "--follow", "--ship-code")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert re.search(rf"\b{done_before} fragments? already committed", again.stdout), again.stdout[-3000:]
    ids = _ids(output)
    assert len(ids) == len(set(ids)) == CORPUS_ROWS and set(ids) == _input_ids()
    assert len(list(commits.glob("*.json"))) == 30


def test_a_head_that_never_gets_ready_fails_submit_in_one_line(ray_head, tmp_path, monkeypatch, capsys):
    from pipeline import cluster

    monkeypatch.setattr(cluster, "SUBMIT_RETRY_S", 3.0)
    output = tmp_path / "out"
    proxy = FlakyProxy(ray_head.address, fail_every=1, fault=NO_AGENT, only=("POST", "/api/jobs/"))
    try:
        started = time.monotonic()
        code, out, err = cli(capsys, "submit", str(_config(tmp_path, output)), "--address", proxy.url)
    finally:
        proxy.stop()
    assert time.monotonic() - started < 20
    assert_one_line_error(subprocess.CompletedProcess([], code, out, err),
                          f"the Ray job server at {proxy.url} kept answering HTTP 500: No available agent to submit "
                          f"job, please try again later. ({proxy.seen} tries in 3 s): the head's job agent is not up")
    assert proxy.seen == proxy.failed >= 2  # asked again, with the same answer every time
    assert not [job for job in _jobs(ray_head).values() if job["output"] == str(output)]


def test_a_real_refusal_is_not_retried(ray_head, tmp_path, monkeypatch, capsys):
    from pipeline import cluster

    taken = f"strata-taken-{os.getpid()}"
    cluster.connect(ray_head.address).submit_job(entrypoint="true", submission_id=taken)
    monkeypatch.setattr(cluster, "_new_job_id", lambda name: taken)
    proxy = FlakyProxy(ray_head.address, only=("POST", "/api/jobs/"))  # counts, passes everything
    try:
        code, out, err = cli(capsys, "submit", str(_config(tmp_path, tmp_path / "out")), "--address", proxy.url)
    finally:
        proxy.stop()
    assert_one_line_error(subprocess.CompletedProcess([], code, out, err),
                          f"the Ray job server at {proxy.url} refused the request: HTTP 500: ValueError: Job with "
                          f"submission_id {taken} already exists")
    assert proxy.seen == 1


def test_unreachable_job_server_fails_fast_with_one_line(tmp_path):
    config = _config(tmp_path, tmp_path / "out")
    started = time.monotonic()
    result = strata("submit", str(config), "--address", f"http://127.0.0.1:{_free_port()}")
    assert time.monotonic() - started < 20  # the CLI's own start-up included
    assert_one_line_error(result, "cannot reach the Ray job server", "Connection refused")
    assert_one_line_error(strata("jobs", "list", "--address", "ray://127.0.0.1:10001"), "http://HOST:8265")


def test_submit_checks_the_config_before_the_cluster(tmp_path):
    bad = write_config(tmp_path / "bad.yaml", input={"uri": str(CORPUS)}, output={"uri": str(tmp_path / "o")},
                       compute={"replicas": 2, "max_replicas": 1})
    assert_one_line_error(strata("submit", str(bad), "--address", "http://127.0.0.1:1"),
                          "max_replicas (1) is below compute.replicas (2)")


def test_job_server_address_from_the_flag_or_rays_variables(monkeypatch):
    from pipeline.cluster import JobError, job_server_url

    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert job_server_url("127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert job_server_url("https://head.example/") == "https://head.example"
    for bad in ("ray://head:10001", "http://head:port", "http://"):
        with pytest.raises(JobError, match="expected the head's job server"):
            job_server_url(bad)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # what ray.init reads: a GCS, not a job server
    with pytest.raises(JobError, match="no Ray job server given"):
        job_server_url(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert job_server_url(None) == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    assert job_server_url(None) == "http://api:8265" and job_server_url("http://flag:1") == "http://flag:1"


def test_the_job_launcher_says_in_one_line_when_no_python_on_the_head_has_strata(tmp_path):
    """A head whose workers' Python is not found (not Linux, or not under Ray) and whose PATH has
    only Pythons without strata: one line saying what to do, exit 1 (Ray quotes it in its message)."""
    from pipeline.cluster import LAUNCHER

    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("python", "python3"):
        (fake / name).write_text("#!/bin/sh\nexit 1\n")
        (fake / name).chmod(0o755)
    shutil.copy(LAUNCHER, tmp_path / "strata-job.sh")
    # run it under a parent that has no Ray loaded, itself orphaned (this test process has Ray)
    orphan = ("import os, subprocess, sys\n"
              "if os.fork(): os._exit(0)\n"
              "os.setsid()\n"
              "with open('err', 'w') as err:\n"
              "    code = subprocess.call(['sh', 'strata-job.sh'], stderr=err)\n"
              "open('code', 'w').write(str(code))\n")
    subprocess.run([sys.executable, "-I", "-c", orphan], cwd=tmp_path, check=True,
                   env={"PATH": f"{fake}{os.pathsep}/usr/bin{os.pathsep}/bin"})
    deadline = time.monotonic() + 30
    while not (tmp_path / "code").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "code").read_text() == "1"
    said = (tmp_path / "err").read_text().splitlines()
    assert len(said) == 1, said
    assert said[0].startswith(f"error: no Python on the Ray head can import strata (tried: {fake}/python {fake}/python3)")
    assert "activate its venv before ray start" in said[0]
