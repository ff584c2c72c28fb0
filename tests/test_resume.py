"""Exactly-once under SIGKILL: kill `strata run` at random moments, resume, compare bitwise."""

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
from rich.console import Console

from conftest import CORPUS, write_config

DOCS = 120


def corpus(folder: Path) -> Path:
    folder.mkdir()
    lines = (CORPUS / "part-0.jsonl").read_text().splitlines()[:DOCS]
    for i in range(3):
        (folder / f"s{i}.jsonl").write_text("\n".join(lines[i::3]) + "\n")
    return folder


def config(tmp_path: Path, name: str, source: Path, output: str | None = None, **sections) -> Path:
    return write_config(
        tmp_path / f"{name}.yaml",
        input={"uri": str(source)}, model={"max_length": 128, "dtype": "float32"},
        outputs=[{"name": "v", "layers": [0, 3, -1], "pooling": "mean", "combine": "stack"}],
        batching={"fragment_docs": 6, "token_budget": 2048},
        output={"uri": output or str(tmp_path / name), "precision": "float32"}, **sections,
    )


def start(cfg: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(cfg)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def commits(out: Path) -> int:
    folder = out / "_manifest" / "fragments"
    return len(list(folder.glob("*.json"))) if folder.is_dir() else 0


def vectors_by_id(out, filesystem=None) -> dict:
    table = ds.dataset(str(out) + "/data", filesystem=filesystem, partitioning="hive").to_table(columns=["id", "v"])
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)), "a document appears twice"
    values = np.array(table["v"].to_pylist(), dtype=np.float32)
    return dict(zip(ids, values))


def kill_repeatedly(cfg: Path, commits_now, times: int, rng: random.Random) -> None:
    """Start `strata run` and SIGKILL its process group after a few more commits, `times` times."""
    kills = 0
    while kills < times:
        proc, target = start(cfg), commits_now() + rng.randint(1, 4)
        deadline = time.monotonic() + 300
        while commits_now() < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        time.sleep(rng.uniform(0, 0.6))  # land anywhere: mid-embed, mid-write, between commits
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1


def straight_run(cfg: Path) -> None:
    """The uninterrupted result, made in this process on the session's cluster (no start-up)."""
    from pipeline.config import load_config
    from pipeline.runner import run

    assert run(load_config(cfg), console=Console(file=io.StringIO()))["docs"] == DOCS


def test_killed_runs_resume_to_the_uninterrupted_result(straight_run_of_resume_corpus, tmp_path):
    source, straight = straight_run_of_resume_corpus
    cfg = config(tmp_path, "killed", source)
    out = tmp_path / "killed"
    kill_repeatedly(cfg, lambda: commits(out), 1, random.Random(7))
    for record in (out / "_manifest" / "fragments").glob("*.json"):  # a record implies its files
        assert all((out / f).is_file() for f in json.loads(record.read_text())["files"])
    final = start(cfg)
    assert final.wait(timeout=600) == 0, final.stderr.read()

    expected, got = vectors_by_id(straight), vectors_by_id(out)
    assert len(got) == DOCS and got.keys() == expected.keys()
    for doc_id, vector in expected.items():
        np.testing.assert_array_equal(got[doc_id], vector)  # fp32 on CPU: bitwise
