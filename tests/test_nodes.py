"""strata on a real multi-node Ray cluster (`ray start` nodes on 127.0.0.1), a node lost mid-run.

The driver joins with RAY_ADDRESS, as on a cluster's head or a machine beside it, on a cluster
with token authentication on.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.dataset as ds
import pytest

from conftest import CORPUS, cli, write_config
from ray_nodes import RayNodes

CORPUS_ROWS = 300


@pytest.fixture(scope="module")
def nodes():
    cluster = RayNodes()
    try:
        cluster.start_head(cpus=0)  # the head runs no work, as on production clusters
        cluster.add_worker(cpus=2)
        cluster.add_worker(cpus=2)
        yield cluster
    finally:
        cluster.stop()


def _config(tmp_path: Path, output: Path) -> Path:
    return write_config(tmp_path / f"{output.name}.yaml", input={"uri": str(CORPUS)}, output={"uri": str(output)},
                        model={"max_length": 64},
                        outputs=[{"name": "sentence", "layers": [-1], "pooling": "mean", "normalize": True}],
                        batching={"fragment_docs": 10})  # 30 fragments: a kill lands mid-run


def _table(output: Path):
    return ds.dataset(output / "data", partitioning="hive").to_table(columns=["id", "sentence"]).sort_by("id")


def _replica() -> psutil.Process | None:
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or [])
        if title.startswith("ray::") and "Embed" in title:
            return process
    return None


def test_a_node_lost_with_the_model_replica_costs_only_its_fragments_and_the_run_exits_0(
        nodes, ray_cluster, tmp_path, capsys):
    # the same config on one node (this test session's Ray): the reference
    reference = tmp_path / "single"
    code, out, err = cli(capsys, "run", str(_config(tmp_path, reference)))
    assert code == 0, out[-2000:] + err[-2000:]

    output = tmp_path / "cluster"
    run = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(_config(tmp_path, output))],
                           env=nodes.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    commits, killed = output / "_manifest" / "fragments", None
    deadline = time.monotonic() + 240
    while killed is None and run.poll() is None and time.monotonic() < deadline:
        replica = _replica() if len(list(commits.glob("*.json"))) >= 2 else None
        node = nodes.node_of(replica) if replica else None
        if node is not None:
            assert node.name != "head"  # the head offers no CPU
            done_at_kill = len(list(commits.glob("*.json")))
            nodes.kill(node)
            killed = node
        time.sleep(0.1)
    log, _ = run.communicate(timeout=300)
    assert killed is not None, f"the replica's node was not killed mid-run:\n{log[-3000:]}"
    assert done_at_kill < 30
    assert run.returncode == 0, log[-4000:]
    lost = [line for line in log.splitlines() if line.startswith("strata: lost ")]
    assert len(lost) == 1 and "committed fragments are kept" in lost[0] and "done again" in lost[0], log[-4000:]
    # the node is named once Ray has marked it dead: in the lost line, or at the end of the run
    assert re.search(r"^strata: .*node \S+ \([0-9a-f]{8}\)", log, re.M), log[-4000:]
    assert "Traceback" not in log and "\x1b[" not in log
    assert "retries remaining" not in log and "marked dead" not in log  # Ray's pushed messages: strata says it

    summary = json.loads((output / "_manifest" / "run.json").read_text())["summary"]
    assert (summary["docs"], summary["quarantined"], summary["failed_rows"]) == (CORPUS_ROWS, 0, 0)
    assert len(list(commits.glob("*.json"))) == 30
    got, want = _table(output), _table(reference)
    ids = got.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == CORPUS_ROWS
    assert ids == want.column("id").to_pylist()
    assert np.array_equal(np.array(got.column("sentence").to_pylist()), np.array(want.column("sentence").to_pylist()))
