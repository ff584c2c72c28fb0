"""The commit protocol's bookkeeping on a local folder, and what strata may delete: only what it
can prove it wrote."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.errors import OutputError
from pipeline.manifest import CommitRecord, Manifest, check_output_folder
from pipeline.storage import Location, overlap


def record(fragment: str, files: list[str]) -> CommitRecord:
    return CommitRecord(fragment, "s.jsonl", 0, 1, files, 1, 1, 0, 0, 3, 3, 0.1)


def test_resume_removes_only_what_the_write_journal_names(tmp_path: Path):
    location = Location.from_uri(str(tmp_path))
    manifest = Manifest(location)
    table = pa.table({"id": ["a"]})
    for name in ("done", "killed"):  # both journaled; only "done" got its commit record
        files = [f"data/source=s.jsonl/{name}.parquet", f"quarantine/{name}.parquet"]
        manifest.begin_writing(name, files)
        for path in files:
            location.write_bytes(b"", path)
            pq.write_table(table, location.path(path))
    manifest.commit(record("done", ["data/source=s.jsonl/done.parquet"]))
    (tmp_path / "data" / "source=s.jsonl" / ".killed.parquet.tmp-1234abcd").write_bytes(b"half a file")
    (tmp_path / "_manifest" / "fragments" / ".x.json.tmp-0badc0de").write_text("{")
    foreign = [tmp_path / "data" / "README.txt", tmp_path / "data" / "source=s.jsonl" / "user.parquet",
               tmp_path / "quarantine" / "keep.parquet", tmp_path / "data" / ".gitkeep",
               tmp_path / "data" / "source=s.jsonl" / ".mine.tmp-1"]
    for path in foreign:
        path.write_bytes(b"not strata's")

    removed = manifest.remove_unfinished()

    assert sorted(removed) == sorted([
        "data/source=s.jsonl/killed.parquet", "quarantine/killed.parquet",
        "data/source=s.jsonl/.killed.parquet.tmp-1234abcd", "_manifest/fragments/.x.json.tmp-0badc0de"])
    assert all(path.read_bytes() == b"not strata's" for path in foreign)
    assert (tmp_path / "data" / "source=s.jsonl" / "done.parquet").is_file() and manifest.committed() == {"done"}
    assert location.list_names("_manifest/writing") == []  # journals are gone once dealt with


def test_a_temporary_file_is_invisible_to_dataset_readers(tmp_path: Path):
    location = Location.from_uri(str(tmp_path))
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "whole.parquet")
    (tmp_path / ".half.parquet.tmp-00000000").write_bytes(b"PAR1 then nothing")  # as a kill leaves it
    assert ds.dataset(tmp_path).to_table().num_rows == 1
    location.write_bytes(b"ok", "sub", "f.bin")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["f.bin"]


def test_an_output_folder_is_empty_or_strata_own(tmp_path: Path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    check_output_folder(Location.from_uri(str(tmp_path / "empty")))  # empty folders are fine
    check_output_folder(Location.from_uri(str(tmp_path / "missing")))
    user = tmp_path / "user"
    (user / "data" / "lang=en").mkdir(parents=True)
    (user / "data" / "lang=en" / "user.parquet").write_bytes(b"x")
    (user / "data" / ".gitkeep").write_bytes(b"")
    with pytest.raises(OutputError, match=r"is not empty and is not a strata output .*data/\.gitkeep"):
        check_output_folder(Location.from_uri(str(user)))
    (user / "_manifest").mkdir()
    (user / "_manifest" / "run.json").write_text("{}")
    check_output_folder(Location.from_uri(str(user)))  # strata's own output


def test_inputs_and_outputs_that_contain_each_other_overlap(tmp_path: Path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "corpus")
    assert overlap(str(tmp_path / "corpus"), str(tmp_path / "corpus" / "emb"))
    assert overlap(str(tmp_path / "proj" / "data"), str(tmp_path / "proj"))
    assert overlap(str(tmp_path / "link") + "/", str(tmp_path / "corpus" / "out"))  # through a symlink
    assert overlap(str(tmp_path / "corpus" / "*.jsonl"), str(tmp_path / "corpus" / "out"))  # a glob's folder
    assert overlap("s3://bucket/corpus/", "s3a://bucket/corpus/emb")
    assert not overlap(str(tmp_path / "corpus"), str(tmp_path / "corpus-emb"))
    assert not overlap("s3://bucket/corpus", "s3://bucket/out") and not overlap("s3://a/x", str(tmp_path))


@pytest.mark.parametrize("content, why", [
    ('{"fragment": "f", "source": "s.jsonl", "start": 0, "end"', "not valid JSON"),
    ('[1, 2]', "holds a JSON list, not an object"),
    ('{"fragment": "f"}', "field 'source' is missing"),
    ('{"fragment": "f", "source": "s.jsonl", "start": "0", "end": 1, "files": [], "rows": 1, "docs": 1, '
     '"quarantined": 0, "blank": 0, "tokens": 3, "padded_tokens": 3, "seconds": 0.1}', "field 'start' is \"0\""),
    ('{"fragment": "f", "source": "s.jsonl", "start": 0, "end": 1, "files": [3], "rows": 1, "docs": 1, '
     '"quarantined": 0, "blank": 0, "tokens": 3, "padded_tokens": 3, "seconds": 0.1}', "field 'files'"),
])
def test_a_damaged_commit_record_is_one_error_naming_it(tmp_path: Path, content, why):
    manifest = Manifest(Location.from_uri(str(tmp_path)))
    (tmp_path / "_manifest" / "fragments").mkdir(parents=True)
    (tmp_path / "_manifest" / "fragments" / "f.json").write_text(content)
    with pytest.raises(OutputError, match=r"_manifest/fragments/f\.json is damaged: .*" + why.replace("(", r"\(")):
        manifest.records()


@pytest.mark.parametrize("content, why", [
    ('{"fingerprint": "ab", "identity": {', "not valid JSON"),
    ('["a"]', "JSON list"),
    ('{"fingerprint": "ab", "identity": {}, "model": {}}', "'plan' is missing"),
])
def test_a_damaged_run_record_is_one_error_naming_it(tmp_path: Path, content, why):
    (tmp_path / "_manifest").mkdir()
    (tmp_path / "_manifest" / "run.json").write_text(content)
    with pytest.raises(OutputError, match=r"run\.json is damaged: .*" + why):
        Manifest(Location.from_uri(str(tmp_path))).read_run()
