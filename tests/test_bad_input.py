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
    with pytest.raises(RunFailed, match=r"0 fragments and 4 shards could not be embedded"):
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
    # a shard is never counted before it is read: one that cannot be read has no row count
    assert "no column 'text'" in failures["no_text.parquet"]["reason"] and failures["no_text.parquet"]["rows"] is None
    assert failures["gone.jsonl"]["rows"] is None and "gone.jsonl" in failures["gone.jsonl"]["reason"]
    assert "Compressed file ended" in failures["truncated.jsonl.gz"]["reason"]
    assert (report["fragments_failed"], report["shards_failed"]) == (0, 4)

    # every input row of a readable shard is embedded, quarantined or blank
    records = [json.loads(p.read_text()) for p in (out / "_manifest" / "fragments").glob("*.json")]
    assert all(r["rows"] == r["docs"] + r["quarantined"] + r["blank"] for r in records)
    assert (report["docs"], report["quarantined"], report["blank"]) == (9, 12, 1)
    rows_in = {"mixed.jsonl": 19, "wrong_type.parquet": 2, "big.jsonl": 1}
    assert sum(r["rows"] for r in records) == sum(rows_in.values())
    assert report["last_run"]["failed_rows"] == 0 and report["fragments_planned"] is None  # not published


# --- hostile values: each costs only its own document, and the output stays one readable dataset ---

def hostile_corpus(folder: Path) -> Path:
    """Shards whose keep fields change type from shard to shard, values Arrow cannot store, texts
    the tokenizer strips to nothing, partition values that collide or are too long for a folder
    name, a multi-frame zstd shard, and files that are not regular files."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    folder.mkdir()
    pq.write_table(pa.table({"id": ["p0", "p1"], "text": ["first parquet document", "second parquet document"],
                             "label": pa.array([1, 2], pa.int64()), "lang": ["en", "en"],
                             "meta": [{"k": 1}, {"k": 2}]}), folder / "a.parquet")  # first: decides the types
    pq.write_table(pa.table({"id": ["q0", "q1"], "text": ["a dictionary label", "a label that is no number"],
                             "label": pa.array(["3", "x"]).dictionary_encode(), "lang": ["fr", "fr"],
                             "meta": [{"k": 3}, None]}), folder / "b.parquet")
    good = [{"id": f"g{i}", "text": f"good neighbour number {i}", "label": i, "lang": "en", "meta": {"k": i}}
            for i in range(12)]
    hostile = [
        '{"id": "s-text", "text": "broken \\ud800 here", "lang": "en"}',
        '{"id": "s-id\\udfff", "text": "a fine text", "lang": "en"}',
        '{"id": "s-keep", "text": "a fine text", "lang": "x\\ud834"}',
        *(json.dumps({"id": f"strip-{i}", "text": text, "lang": "en"})
          for i, text in enumerate(["\u200b\u200d", "\ufeff", "\u202e", "\x80", "\u00ad\u00ad"])),
        '{"id": "marker", "text": "a value equal to the null marker", "lang": "__HIVE_DEFAULT_PARTITION__"}',
        '{"id": "null", "text": "a null partition value", "lang": null}',
        json.dumps({"id": "long", "text": "a very long partition value", "lang": "é" * 200}),
        '{"id": "str-label", "text": "a label given as a string", "label": "7", "lang": "en"}',
        '{"id": "bad-meta", "text": "meta that is not an object", "meta": "x", "lang": "en"}',
    ]
    (folder / "c.jsonl").write_text("".join(json.dumps(g) + "\n" for g in good[:6]) + "\n".join(hostile) + "\n"
                                    + "".join(json.dumps(g) + "\n" for g in good[6:]))
    z = zstandard.ZstdCompressor()
    frames = [b"".join(json.dumps({"id": f"z{i}", "text": f"zstd document {i}", "lang": "de"}).encode() + b"\n"
                       for i in range(start, start + 3)) for start in (0, 3)]
    (folder / "d.jsonl.zst").write_bytes(b"".join(z.compress(frame) for frame in frames))
    os.mkfifo(folder / "fifo.jsonl")
    (folder / "zero.txt").symlink_to("/dev/zero")
    return folder


@pytest.fixture(scope="module")
def hostile_run(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    corpus, out = hostile_corpus(root / "in"), root / "out"
    cfg = parse_config({"input": {"uri": str(corpus), "keep_fields": ["label", "lang", "meta"]},
                        "model": {"max_length": 32}, "batching": {"fragment_docs": 100},
                        "output": {"uri": str(out), "partition_by": "lang"}, "run": {"max_error_rate": 1.0}})
    summary = run(cfg)
    return out, summary


def _quarantine(out: Path) -> dict[str, str]:
    return {q["id"]: q["reason"] for q in ds.dataset(out / "quarantine").to_table().to_pylist()}


def test_strings_arrow_cannot_store_and_texts_with_no_tokens_are_quarantined_alone(hostile_run):
    out, summary = hostile_run
    reasons = _quarantine(out)
    assert "lone surrogate" in reasons["s-text"] and "lone surrogate" in reasons["s-keep"]
    assert "lone surrogate" in reasons["s-id\\udfff"]  # escaped, so the quarantine file can hold it
    for i in range(5):
        assert reasons[f"strip-{i}"].startswith("the tokenizer keeps nothing of the text"), reasons[f"strip-{i}"]
    ids = set(ds.dataset(out / "data").to_table()["id"].to_pylist())
    assert {f"g{i}" for i in range(12)} | {"z0", "z5", "marker", "null", "long", "str-label"} <= ids
    assert summary["docs"] + summary["quarantined"] + summary["blank"] == 2 + 2 + 12 + 13 + 6
    assert summary["failed_fragments"] == summary["failed_shards"] == 0


def test_one_output_one_schema_whatever_the_shards_hold(hostile_run):
    out, _ = hostile_run
    run_record = json.loads((out / "_manifest" / "run.json").read_text())
    assert run_record["keep_types"] == {"label": "int64", "lang": "string", "meta": "struct<k: int64>"}
    table = ds.dataset(out / "data").to_table()  # every file read together
    labels = dict(zip(table["id"].to_pylist(), table["label"].to_pylist()))
    assert labels["p1"] == 2 and labels["str-label"] == 7 and labels["g3"] == 3 and labels["q0"] == 3
    reasons = _quarantine(out)
    assert "kept field 'label' is \"x\", which is not a int64" in reasons["q1"]
    assert "which is not a struct<k: int64>" in reasons["bad-meta"]
    import glob

    snapshot = json.loads(open(max(glob.glob(f"{out}/_manifest/versions/*.json"))).read())  # the README's reader
    assert ds.dataset([f"{out}/{f}" for f in snapshot["files"]], format="parquet").to_table().num_rows == table.num_rows


def test_distinct_partition_values_never_share_a_folder_and_folder_names_stay_short(hostile_run):
    out, _ = hostile_run
    table = ds.dataset(out / "data").to_table()
    langs = dict(zip(table["id"].to_pylist(), table["lang"].to_pylist()))
    assert langs["marker"] == "__HIVE_DEFAULT_PARTITION__" and langs["null"] is None and langs["long"] == "é" * 200
    folders = {p.name for p in (out / "data").iterdir()}
    assert {"lang=__HIVE_DEFAULT_PARTITION__", "lang=%5F_HIVE_DEFAULT_PARTITION__"} <= folders
    assert all(len(name.encode()) <= 160 for name in folders)
    assert table.num_rows == len(set(zip(table["source"].to_pylist(), table["row"].to_pylist())))  # nothing twice


def test_special_files_in_the_input_are_ignored_not_read(hostile_run):
    out, _ = hostile_run
    shards = json.loads(sorted((out / "_manifest" / "versions").glob("*.json"))[-1].read_text())["shards"]
    assert sorted(shards) == ["a.parquet", "b.parquet", "c.jsonl", "d.jsonl.zst"]
