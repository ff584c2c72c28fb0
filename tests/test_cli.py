"""The command line as a user meets it: exit codes, one-line errors, no tracebacks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CORPUS, write_config


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
    assert "2 shards, 300 rows, 4 fragments" in result.stderr


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
