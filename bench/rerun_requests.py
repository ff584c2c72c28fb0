"""Object-storage requests and wall time of rerunning `strata run` on an output where everything
is committed (issue: "start embedding in seconds at any corpus size").

It starts moto's S3 server (`python -m moto.server`) on 127.0.0.1 with a free port, its stderr
(werkzeug's log: one line per request, `"GET /bucket/key HTTP/1.1" 200 -`) going to a file;
a phase's requests are the log lines written between its start and its end (the server serves
nobody else). Through boto3 it creates a bucket and uploads a corpus that plans to exactly
`--fragments N` fragments: min(N, 50) JSONL shards of short synthetic documents, shard i holding
2 * f_i documents where the f_i add up to N, with `batching.fragment_docs: 2`. Then, driving the
CLI (`strata run` / `strata status` as subprocesses; packaged model, `model.max_length: 16`):

  first run   `strata run` to completion (wall time and requests printed; not a target)
  (A) published             the same command again: version 1 is published, nothing to do
  (B) committed, unpublished  `_manifest/versions/00000001.json` deleted (what a run killed just
                            before publishing leaves), then the same command: it must exit 0
                            with the snapshot published again
  (C) status                `strata status s3://...`

Target (from the issue): on a 1,000-fragment output on moto with everything committed, a rerun
makes <= 50 requests and ends <= 15 s after start. It applies to (A) and (B); (C) has none.
At other sizes the figures are printed next to the same target as an indication only.
Every invocation starts from scratch (moto keeps its buckets in memory), so the phases cannot be
run separately against an earlier output; each phase's strata output is kept beside moto's log.

Usage:
  python bench/rerun_requests.py                      # 1,000 fragments (the first run takes minutes)
  python bench/rerun_requests.py --fragments 200 --env PYTHONPATH=/tmp/strata-before
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import boto3
import yaml

BUCKET = "strata-bench"
SNAPSHOT = "out/_manifest/versions/00000001.json"
TARGET = {"requests": 50, "seconds": 15.0}
REQUEST = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3})')
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # werkzeug colours the lines of non-200 answers
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """moto's S3 server in a process of its own; `requests()` reads its log from a given offset."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "moto.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"error: moto's server did not start:\n{self.log_path.read_text()[-2000:]}")
                time.sleep(0.2)

    def offset(self) -> int:
        time.sleep(0.5)  # a request's log line is written after its response
        return self.log_path.stat().st_size

    def requests(self, start: int, end: int) -> list[tuple[str, str, str]]:
        with open(self.log_path, "rb") as f:
            f.seek(start)
            text = f.read(end - start).decode(errors="replace")
        return [m.groups() for m in map(REQUEST.search, ANSI.sub("", text).splitlines()) if m]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def layout(fragments: int) -> list[int]:
    """Documents per shard: min(N, 50) shards whose fragments of 2 documents add up to N."""
    shards = min(fragments, 50)
    return [2 * (fragments // shards + (i < fragments % shards)) for i in range(shards)]


def upload_corpus(s3, fragments: int) -> int:
    docs = 0
    for i, n in enumerate(layout(fragments)):
        lines = [json.dumps({"id": f"s{i}-{j}", "text": f"Shard {i}, document {j}: a short text to embed."})
                 for j in range(n)]
        s3.put_object(Bucket=BUCKET, Key=f"in/part-{i:03d}.jsonl", Body=("\n".join(lines) + "\n").encode())
        docs += n
    return docs


def shape(path: str) -> str:
    """A request with its variable parts collapsed, for the breakdown: names holding digits and
    partition values become `*`; a listing shows its prefix and delimiter."""
    path, _, query = path.partition("?")
    parts = [re.sub(r"=.*", "=*", p) if "=" in p else ("*" if re.search(r"\d", p) else p) for p in path.split("/")]
    params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    if "list-type" in params:
        prefix = "/".join("*" if re.search(r"\d", p) else p for p in params.get("prefix", "").split("/"))
        return f"{'/'.join(parts[:2])} list {prefix!r}" + (" delimiter=/" if params.get("delimiter") else "")
    return "/".join(parts) + ("?" + "&".join(params) if params else "")


def timed(moto: Moto, name: str, command: list[str], env: dict, cwd: Path, timeout: float) -> dict:
    start = moto.offset()
    started = time.monotonic()
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group: Ray's processes go with it on a timeout
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr += f"\n(killed after {timeout:g} s)"
    seconds = time.monotonic() - started
    requests = moto.requests(start, moto.offset())
    (cwd / f"{name}.log").write_text(stdout + stderr)  # strata's output of this phase
    return {"requests": len(requests), "seconds": round(seconds, 2), "exit_code": proc.returncode,
            "_log": requests, "_stderr": stderr, "_stdout": stdout}


def met(result: dict, key: str) -> bool:
    return result["exit_code"] == 0 and result[key] <= TARGET[key]


def report(name: str, result: dict, target: bool, breakdown: bool = True) -> None:
    marks = ""
    if target:
        marks = "   " + "  ".join(f"{key} <= {TARGET[key]:g}: {'met' if met(result, key) else 'not met'}"
                                  for key in TARGET)
    print(f"{name:<28} {result['requests']:>8} {result['seconds']:>9.1f} {result['exit_code']:>5}{marks}", flush=True)
    if breakdown and result["_log"]:
        counts = collections.Counter(f"{method} {shape(path)} {status}" for method, path, status in result["_log"])
        for line, count in counts.most_common(10):
            print(f"    {count:>6}  {line}")
    if result["exit_code"] != 0:
        print("    strata's output (last lines):")
        print("\n".join("    | " + line for line in (result["_stdout"] + result["_stderr"]).splitlines()[-20:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fragments", type=int, default=1000, help="fragments of the output (default 1000)")
    parser.add_argument("--strata", default=None, help="strata executable (default: next to this Python)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VAL", help="set for the runs (repeatable)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds each strata command may take")
    args = parser.parse_args()
    if args.fragments < 1:
        sys.exit("error: --fragments must be at least 1")

    strata = args.strata or str(Path(sys.executable).parent / "strata")
    if not Path(strata).exists():
        strata = shutil.which("strata") or sys.exit("error: no strata executable: pass --strata")
    workdir = Path(tempfile.mkdtemp(prefix="strata-rerun-"))
    moto = Moto(workdir)
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": moto.endpoint}
    env.pop("RAY_ADDRESS", None)  # a local Ray of the run's own, unless --env says otherwise
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"error: --env {item!r}: expected KEY=VAL")
        env[key] = value
    try:
        s3 = boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1",
                          aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        s3.create_bucket(Bucket=BUCKET)
        docs = upload_corpus(s3, args.fragments)
        config = workdir / "config.yaml"
        config.write_text(yaml.safe_dump({
            "input": {"uri": f"s3://{BUCKET}/in/"},
            "model": {"name_or_path": "default", "max_length": 16},
            "outputs": [{"name": "v", "layers": [-1], "pooling": "mean", "combine": "concat"}],
            "batching": {"fragment_docs": 2},
            "output": {"uri": f"s3://{BUCKET}/out"},
            "storage": {"endpoint_url": moto.endpoint}}, sort_keys=False))
        run = [strata, "run", str(config)]
        print(f"moto at {moto.endpoint} (log {moto.log_path}); {len(layout(args.fragments))} shards, {docs:,} docs, "
              f"{args.fragments:,} fragments; {strata}{'; ' + ' '.join(args.env) if args.env else ''}", flush=True)

        load = os.getloadavg()[0]  # the machine may be shared: seconds taken under load are longer
        print(f"load average {load:.1f} on {os.cpu_count()} CPUs")
        print(f"\n{'phase':<28} {'requests':>8} {'seconds':>9} {'exit':>5}")
        first = timed(moto, "first-run", run, env, workdir, args.timeout)
        report("first run", first, target=False)
        committed = sum(page.get("KeyCount", 0) for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix="out/_manifest/fragments/"))
        if first["exit_code"] != 0 or committed != args.fragments:
            sys.exit(f"error: the first run did not commit {args.fragments} fragments ({committed} committed)")

        published = timed(moto, "A-published", run, env, workdir, args.timeout)
        report("(A) published", published, target=True)

        s3.delete_object(Bucket=BUCKET, Key=SNAPSHOT)
        unpublished = timed(moto, "B-unpublished", run, env, workdir, args.timeout)
        republished = "Contents" in s3.list_objects_v2(Bucket=BUCKET, Prefix=SNAPSHOT)
        report("(B) committed, unpublished", unpublished, target=True)
        if not republished:
            print(f"    {SNAPSHOT} was NOT published again")

        status = timed(moto, "C-status", [strata, "status", f"s3://{BUCKET}/out"], env, workdir, args.timeout)
        report("(C) status", status, target=False)
    finally:
        moto.stop()

    public = lambda r: {k: v for k, v in r.items() if not k.startswith("_")}  # noqa: E731
    ok = published["exit_code"] == 0 and unpublished["exit_code"] == 0 and republished and status["exit_code"] == 0
    result = {"fragments": args.fragments, "published_rerun": public(published),
              "unpublished_rerun": {**public(unpublished), "republished": republished}, "status": public(status),
              "first_run": public(first), "load_avg_1m_at_start": round(load, 2),
              "targets_met": {"published_rerun": all(met(published, key) for key in TARGET),
                              "unpublished_rerun": republished and all(met(unpublished, key) for key in TARGET)}}
    print(f"\ntarget (for 1,000 fragments): a rerun makes <= {TARGET['requests']} requests and ends "
          f"<= {TARGET['seconds']:g} s after start\nmoto's log and strata's output per phase: {workdir}")
    print(json.dumps(result))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
