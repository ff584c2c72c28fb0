"""A corpus with every kind of bad input: the run finishes, nothing is dropped silently, counts reconcile."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from pipeline.config import parse_config
from pipeline.runner import RunFailed, run

from conftest import DATA, write_config

BIG_DOC_BYTES = 10 * 1024 * 1024


@pytest.fixture
def bad_corpus(tmp_path) -> Path:
    corpus = tmp_path / "bad"
    shutil.copytree(DATA / "bad", corpus)
    with open(corpus / "big.jsonl", "w") as f:  # one 10 MB document
        f.write(json.dumps({"id": "big", "text": "lorem ipsum dolor sit amet " * (BIG_DOC_BYTES // 27), "lang": "en"}))
    os.symlink(tmp_path / "nowhere.jsonl", corpus / "gone.jsonl")  # listed, but cannot be opened
    return corpus


def bad_config(corpus: Path, out: Path) -> dict:
    return {"input": {"uri": str(corpus), "keep_fields": ["lang"]}, "model": {"max_length": 32},
            "batching": {"fragment_docs": 8}, "output": {"uri": str(out), "partition_by": "lang"},
            "run": {"max_error_rate": 1.0}}


def test_every_bad_input_is_quarantined_or_recorded_and_counts_reconcile(ray_cluster, bad_corpus, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RunFailed, match=r"1 fragment and 3 shards could not be embedded"):
        run(parse_config(bad_config(bad_corpus, out)))

    data = ds.dataset(out / "data", partitioning="hive").to_table()
    ids = sorted(data["id"].to_pylist())
    assert ids.count("dup") == 2  # duplicate ids are kept: (source, row) is the key
    assert {"big", "../../etc/passwd", "a/b\x00c"} <= set(ids) and len(ids) == 9
    assert data.filter(ds.field("id") == "big").to_pylist()[0]["truncated"] is True
    assert sorted(set(data["lang"].to_pylist())) == ["../../escape", "en", "nul\x00/x"]
    written = [p.resolve() for p in out.rglob("*") if p.is_file()]
    assert all(out.resolve() in p.parents for p in written)  # nothing lands outside the output
    assert {p.name for p in (out / "data").iterdir()} == {"lang=en", "lang=..%2F..%2Fescape", "lang=nul%00%2Fx"}

    quarantine = ds.dataset(out / "quarantine").to_table().to_pylist()
    reasons = {(q["source"], q["id"]): q["reason"] for q in quarantine}
    expected = {
        "mixed.jsonl#8": "malformed JSON", "no-text": "no 'text' field", "null-text": "'text' is null",
        "number": "'text' is a int, not a string", "empty": "'text' is empty or whitespace",
        "spaces": "'text' is empty or whitespace", "nuls": "only whitespace and control characters",
        "mixed.jsonl#15": "a JSON list, not an object", "mixed.jsonl#17": "invalid UTF-8",
        "mixed.jsonl#18": "malformed JSON",  # a raw NUL byte inside a JSON string
    }
    for doc_id, reason in expected.items():
        assert reason in reasons[("mixed.jsonl", doc_id)], (doc_id, reasons[("mixed.jsonl", doc_id)])
    assert reasons[("wrong_type.parquet", "w1")] == "'text' is a int, not a string"
    assert len(quarantine) == len(expected) + 2

    status = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(out), "--json"],
                            capture_output=True, text=True, timeout=120)
    report = json.loads(status.stdout)
    failures = {f["source"]: f for f in report["failures"]}
    assert set(failures) == {"truncated.jsonl.gz", "corrupt.parquet", "gone.jsonl", "no_text.parquet"}
    assert "no column 'text'" in failures["no_text.parquet"]["reason"] and failures["no_text.parquet"]["rows"] == 2
    assert failures["gone.jsonl"]["rows"] is None and "gone.jsonl" in failures["gone.jsonl"]["reason"]
    assert "Compressed file ended" in failures["truncated.jsonl.gz"]["reason"]
    assert (report["fragments_failed"], report["shards_failed"]) == (1, 3)

    # every input row of a readable shard is embedded, quarantined or blank; failed rows are counted
    records = [json.loads(p.read_text()) for p in (out / "_manifest" / "fragments").glob("*.json")]
    assert all(r["rows"] == r["docs"] + r["quarantined"] + r["blank"] for r in records)
    assert (report["docs"], report["quarantined"], report["blank"]) == (9, 12, 1)
    rows_in = {"mixed.jsonl": 19, "wrong_type.parquet": 2, "big.jsonl": 1}
    assert sum(r["rows"] for r in records) == sum(rows_in.values())
    assert report["last_run"]["failed_rows"] == 2
