"""The commit protocol's bookkeeping, on a local folder."""

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.manifest import CommitRecord, Manifest
from pipeline.storage import Location


def record(fragment: str, files: list[str]) -> CommitRecord:
    return CommitRecord(fragment, "s.jsonl", 0, 1, files, 1, 1, 0, 0, 3, 3, 0.1)


def test_resume_removes_what_no_commit_record_accounts_for(tmp_path: Path):
    location = Location.from_uri(str(tmp_path))
    manifest = Manifest(location)
    table = pa.table({"id": ["a"]})
    for name in ("done", "orphan"):
        location.write_bytes(b"", "data", "source=s.jsonl", f"{name}.parquet")
        pq.write_table(table, location.path("data", "source=s.jsonl", f"{name}.parquet"))
    location.write_bytes(b"x", "quarantine", "orphan.parquet")
    (tmp_path / "data" / "source=s.jsonl" / ".done.parquet.tmp-1234abcd").write_bytes(b"half a file")
    manifest.commit(record("done", ["data/source=s.jsonl/done.parquet"]))
    (tmp_path / "_manifest" / "fragments" / ".x.json.tmp-1").write_text("{")
    (tmp_path / "data" / "README.txt").write_text("not ours: kept")

    removed = manifest.remove_uncommitted(manifest.committed())

    assert sorted(removed) == sorted([
        "data/source=s.jsonl/orphan.parquet", "data/source=s.jsonl/.done.parquet.tmp-1234abcd",
        "quarantine/orphan.parquet", "_manifest/fragments/.x.json.tmp-1"])
    assert ds.dataset(tmp_path / "data" / "source=s.jsonl").to_table()["id"].to_pylist() == ["a"]
    assert (tmp_path / "data" / "README.txt").is_file() and manifest.committed() == {"done"}


def test_a_temporary_file_is_invisible_to_dataset_readers(tmp_path: Path):
    location = Location.from_uri(str(tmp_path))
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "whole.parquet")
    (tmp_path / ".half.parquet.tmp-00000000").write_bytes(b"PAR1 then nothing")  # as a kill leaves it
    assert ds.dataset(tmp_path).to_table().num_rows == 1
    location.write_bytes(b"ok", "sub", "f.bin")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["f.bin"]
