"""Start-up cost of `strata run` at large corpus sizes: seconds to the first embedded fragment
and the driver's peak memory (issue: "start embedding in seconds at any corpus size").

It drives the CLI as a user does: writes a config, starts `strata run CONFIG` in a process group
of its own and polls every 0.1 s
  - the driver's RSS (the `strata` process itself, not Ray's workers), keeping the peak, and
  - whether the first commit record `OUTPUT/_manifest/fragments/*.json` exists.
By default the run is stopped (SIGINT to its group, as Ctrl-C does) once that record appears;
`--full` lets it finish and also reports the wall time and exit code. Every process the run
started (Ray's GCS, raylet, workers: collected while it runs) is killed afterwards; `ray stop`
is never used, so other Ray instances on the machine are left alone.

Corpora (built once under --cache, then reused):
  --shards N    N tiny JSONL shards of 2 short documents each, in nested folders of <= 1000
                files; the default `batching.fragment_docs`, so one fragment per shard.
  --gzip-gb G   ONE gzip JSONL shard of about G GB uncompressed: the lines of
                /work/shared/corpus/docs-50k.jsonl.gz repeated with unique ids (zlib level 1,
                written in multi-MB chunks); `batching.fragment_docs: 100`.
Every run uses the packaged default model with `model.max_length: 32`, one last-layer mean
output, and a fresh output folder under --cache.

Targets (from the issue):
  100,000 shards:      first fragment <= 30 s after start, driver peak RSS <= 400 MB
  a 2 GB gzip shard:   first fragment <= 15 s after start
At other sizes the figures are printed next to the same targets as an indication only.

Usage:
  python bench/startup.py --shards 100000
  python bench/startup.py --gzip-gb 2 --full
  python bench/startup.py --shards 10000 --env PYTHONPATH=/tmp/strata-before   # another checkout
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import psutil
import yaml

SOURCE = Path("/work/shared/corpus/docs-50k.jsonl.gz")
TARGETS = {"shards": {"first_fragment_s": 30.0, "peak_rss_mb_first": 400.0},
           "gzip": {"first_fragment_s": 15.0}}
TARGET_SIZE = {"shards": "100,000 shards", "gzip": "a 2 GB gzip shard"}


def build_shards(cache: Path, n: int) -> Path:
    root = cache / f"shards-{n}"
    if (cache / f"shards-{n}.done").exists():
        return root
    print(f"building {n:,} tiny shards in {root} ...", flush=True)
    started = time.monotonic()
    shutil.rmtree(root, ignore_errors=True)
    for i in range(n):
        folder = root / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True)
        docs = (json.dumps({"id": f"s{i}-{j}", "text": f"Shard {i}, document {j}: a short text to embed."})
                for j in range(2))
        (folder / f"s{i:07d}.jsonl").write_text("\n".join(docs) + "\n")
    (cache / f"shards-{n}.done").touch()
    print(f"  built in {time.monotonic() - started:.1f} s", flush=True)
    return root


def build_gzip(cache: Path, gb: float) -> Path:
    path = cache / f"gzip-{gb:g}gb" / "docs.jsonl.gz"
    if path.exists():
        return path
    if not SOURCE.exists():
        sys.exit(f"error: {SOURCE} is missing: the gzip corpus is made from it")
    print(f"building one gzip shard of ~{gb:g} GB uncompressed at {path} ...", flush=True)
    started = time.monotonic()
    lines = gzip.open(SOURCE, "rb").read()
    assert lines.count(b'{"id": "') == lines.count(b"\n"), "every line must start with its id"
    want, written, rep = int(gb * 1e9), 0, 0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".building.jsonl.gz")
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    with open(tmp, "wb") as out:
        while written < want:
            chunk = lines.replace(b'{"id": "', b'{"id": "r%d-' % rep)  # unique ids per repetition
            if written + len(chunk) > want:
                chunk = chunk[:chunk.rfind(b"\n", 0, want - written) + 1] or chunk[:chunk.find(b"\n") + 1]
            for start in range(0, len(chunk), 8 << 20):
                out.write(compressor.compress(chunk[start:start + (8 << 20)]))
            written += len(chunk)
            rep += 1
        out.write(compressor.flush())
    tmp.rename(path)
    print(f"  built in {time.monotonic() - started:.1f} s: {written / 1e9:.2f} GB uncompressed, "
          f"{path.stat().st_size / 1e9:.2f} GB compressed", flush=True)
    return path


def write_config(run_dir: Path, input_uri: Path, fragment_docs: int | None) -> Path:
    config = {"input": {"uri": str(input_uri)},
              "model": {"name_or_path": "default", "max_length": 32},
              "outputs": [{"name": "v", "layers": [-1], "pooling": "mean", "combine": "concat"}],
              "output": {"uri": str(run_dir / "out")}}
    if fragment_docs:
        config["batching"] = {"fragment_docs": fragment_docs}
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def first_commit(fragments: Path) -> bool:
    try:
        with os.scandir(fragments) as entries:
            return any(e.name.endswith(".json") and not e.name.startswith(".") for e in entries)
    except FileNotFoundError:
        return False


class Timeline:
    """strata's output lines with the time each was first seen (Ray's own warnings left out)."""

    def __init__(self, path: Path):
        self.file, self.rest, self.lines = open(path, "rb"), b"", []

    def read(self, now: float | None) -> None:
        self.rest += self.file.read()
        *done, self.rest = self.rest.split(b"\n")
        self.lines += [(now, line.decode(errors="replace")) for line in done
                       if line.strip() and not line.startswith(b"[20")]


def stop(proc: subprocess.Popen, known: dict[int, psutil.Process]) -> int:
    """SIGINT to the run's group (Ctrl-C), up to 30 s, then SIGKILL; then every process it started.
    Returns how many of those had to be killed after the driver was gone."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            print("  the run did not stop within 30 s of SIGINT: SIGKILL to its group", flush=True)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()
    return reap(proc.pid, known)


def reap(pgid: int, known: dict[int, psutil.Process]) -> int:
    """Give the run's processes 5 s to exit by themselves, then SIGKILL what is left of its group and
    of the processes seen while it ran (and their children). Returns how many were killed."""
    deadline = time.monotonic() + 5
    while (alive := [p for p in known.values() if live(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in list(alive):  # also their children started after the last poll
        try:
            alive += p.children(recursive=True)
        except psutil.Error:
            pass
    alive = list({p.pid: p for p in alive if live(p)}.values())
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    deadline = time.monotonic() + 10
    while any(live(p) for p in alive) and time.monotonic() < deadline:
        time.sleep(0.1)
    return len(alive)


def live(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def verdict(value, target) -> str:
    return "met" if value is not None and value <= target else "not met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    corpus = parser.add_mutually_exclusive_group(required=True)
    corpus.add_argument("--shards", type=int, help="N tiny JSONL shards (2 docs each)")
    corpus.add_argument("--gzip-gb", type=float, help="one gzip JSONL shard of about G GB uncompressed")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/strata-bench"), help="corpora and outputs")
    parser.add_argument("--strata", default=None, help="strata executable (default: next to this Python)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VAL", help="set for the run (repeatable)")
    parser.add_argument("--full", action="store_true", help="let the run finish (default: stop at the first fragment)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before the run is stopped")
    args = parser.parse_args()

    strata = args.strata or str(Path(sys.executable).parent / "strata")
    if not Path(strata).exists():
        strata = shutil.which("strata") or sys.exit("error: no strata executable: pass --strata")
    env = dict(os.environ)
    if env.pop("RAY_ADDRESS", None):
        print("note: RAY_ADDRESS is ignored: the run starts its own local Ray (pass --env RAY_ADDRESS=... to join one)")
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"error: --env {item!r}: expected KEY=VAL")
        env[key] = value

    args.cache.mkdir(parents=True, exist_ok=True)
    corpora = args.cache / "corpora"
    corpora.mkdir(exist_ok=True)
    if args.shards:
        case, size = "shards", f"{args.shards:,} shards"
        input_uri, fragment_docs = build_shards(corpora, args.shards), None
    else:
        case, size = "gzip", f"one gzip shard of {args.gzip_gb:g} GB"
        input_uri, fragment_docs = build_gzip(corpora, args.gzip_gb), 100
    (args.cache / "runs").mkdir(exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{case}-", dir=args.cache / "runs"))
    config = write_config(run_dir, input_uri, fragment_docs)
    fragments = run_dir / "out" / "_manifest" / "fragments"
    log = open(run_dir / "strata.log", "wb")

    load = os.getloadavg()[0]  # the machine may be shared: figures taken under load are slower
    print(f"strata run {config}  ({size}; {strata}{'; ' + ' '.join(args.env) if args.env else ''}; "
          f"load average {load:.1f} on {os.cpu_count()} CPUs)", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen([strata, "run", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=run_dir, start_new_session=True)
    driver = psutil.Process(proc.pid)
    known: dict[int, psutil.Process] = {}
    first = peak_first = None
    peak = 0
    timed_out = False
    timeline = Timeline(run_dir / "strata.log")
    try:
        while proc.poll() is None:
            try:
                peak = max(peak, driver.memory_info().rss)
                for child in driver.children(recursive=True):
                    known.setdefault(child.pid, child)
            except psutil.Error:
                pass
            timeline.read(time.monotonic() - started)
            if first is None and first_commit(fragments):
                first, peak_first = time.monotonic() - started, peak
                print(f"  first commit record after {first:.1f} s (driver peak RSS so far {peak / 2**20:.0f} MB)",
                      flush=True)
                if not args.full:
                    break
            if time.monotonic() - started > args.timeout:
                timed_out = True
                print(f"  timed out after {args.timeout:g} s", flush=True)
                break
            time.sleep(0.1)
        if first is None and first_commit(fragments):  # committed as the run ended
            first, peak_first = time.monotonic() - started, peak
    finally:
        wall = time.monotonic() - started
        leftover = stop(proc, known)
        log.close()
    code = proc.returncode

    result = {"case": case, "size": args.shards if case == "shards" else args.gzip_gb,
              "first_fragment_s": round(first, 2) if first is not None else None,
              "peak_rss_mb_first": round(peak_first / 2**20, 1) if peak_first is not None else None,
              "peak_rss_mb": round(peak / 2**20, 1), "timed_out": timed_out, "exit_code": code,
              "killed_after_stop": leftover, "load_avg_1m_at_start": round(load, 2)}
    if args.full:
        result["wall_s"] = round(wall, 2)
    timeline.read(None)  # what it printed after it was told to stop, or as it ended
    print("  strata's lines as they appeared (s after start):")
    for t, line in timeline.lines[:8]:
        print(f"    {'end' if t is None else f'{t:.1f}':>6}  {line[:150]}")
    failed = first is None or (args.full and code != 0)
    if failed:
        tail = (run_dir / "strata.log").read_text(errors="replace").splitlines()[-30:]
        print(f"  the run ended with exit code {code} " + ("before any fragment was committed" if first is None
                                                           else "") + "; the last lines of its output:")
        print("\n".join("    | " + line for line in tail))

    print(f"\n{size}  (targets are for {TARGET_SIZE[case]})")
    for key, target in TARGETS[case].items():
        unit = "s" if key.endswith("_s") else "MB"
        value = result[key]
        shown = f"{value:g} {unit}" if value is not None else "none"
        print(f"  {key:<20} {shown:>12}   target <= {target:g} {unit}: {verdict(value, target)}")
        result[f"{key}_met"] = verdict(value, target) == "met"
    if case == "gzip":
        print(f"  {'peak_rss_mb_first':<20} {str(result['peak_rss_mb_first']) + ' MB':>12}   (no target)")
    print(f"  {'peak_rss_mb (seen)':<20} {result['peak_rss_mb']:>9g} MB   (until the run {'ended' if args.full else 'was stopped'})")
    if args.full:
        print(f"  {'wall_s':<20} {result['wall_s']:>10g} s    exit code {code}")
    if leftover:
        print(f"  {leftover} process(es) of the run were still alive after it stopped and were killed")
    print(f"  run folder: {run_dir}")
    print(json.dumps(result))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
