"""Change detection as pure functions: content hashes, a shard's diff, which versions gc drops."""

import pyarrow as pa
import pytest

from pipeline.changes import HASH, content_hashes, count_changes, diff, index_table
from pipeline.incremental import split_by_changes
from pipeline.errors import InputError
from pipeline.manifest import CommitRecord
from pipeline.versions import Snapshot, collectable


def docs(ids, texts, **kept):
    return pa.table({"id": ids, "source": ["s.jsonl"] * len(ids), "row": pa.array(range(len(ids)), pa.int64()),
                     "text": texts, **kept})


def test_content_hash_covers_text_and_kept_fields_only():
    base = content_hashes(docs(["a", "b"], ["same", "same"], lang=["en", "en"]), ["lang"])
    assert base.type == HASH and base[0] == base[1]  # the id is the key, not part of the content
    other_lang = content_hashes(docs(["a"], ["same"], lang=["fr"]), ["lang"])
    assert other_lang[0] != base[0]
    assert content_hashes(docs(["a"], ["same"]), [])[0] != base[0]
    assert content_hashes(docs(["a"], ["same!"], lang=["en"]), ["lang"])[0] != base[0]


def index(ids, texts, fragment=None):
    table = index_table(pa.array(ids, pa.string()), content_hashes(docs(ids, texts), []),
                        pa.array(range(len(ids)), pa.int64()))
    if fragment:
        table = table.append_column("fragment", pa.array([fragment] * len(ids)))
    return table


def test_diff_classifies_every_document_once():
    old = index(["a", "b", "c", "d"], ["A", "B", "C", "D"], "f1")
    new = index(["b", "e", "a", "c"], ["B", "E", "A", "C-edited"])  # d deleted, e added, rows moved
    changes = diff(old, new)
    by_id = {r["id"]: r for r in changes.to_pylist()}
    assert {k: v["change"] for k, v in by_id.items()} == {
        "a": "unchanged", "b": "unchanged", "c": "changed", "d": "deleted", "e": "added"}
    assert (by_id["a"]["row"], by_id["a"]["old_row"], by_id["a"]["old_fragment"]) == (2, 0, "f1")
    assert by_id["d"]["row"] is None and changes["row"].to_pylist()[-1] is None  # deleted last
    assert count_changes(changes) == {"added": 1, "changed": 1, "unchanged": 2, "deleted": 1}


def test_duplicate_ids_are_matched_by_occurrence():
    old = index(["x", "x", "y"], ["first", "second", "Y"], "f1")
    new = index(["x", "y"], ["second", "Y"])  # the first x was deleted: the survivor reads as changed
    assert count_changes(diff(old, new)) == {"added": 0, "changed": 1, "unchanged": 1, "deleted": 1}
    assert count_changes(diff(old, index(["x", "x", "y"], ["first", "second", "Y"]))) == {
        "added": 0, "changed": 0, "unchanged": 3, "deleted": 0}


def test_diff_of_a_new_and_of_a_deleted_shard():
    empty_old = index([], [], None).append_column("fragment", pa.array([], pa.string()))
    assert count_changes(diff(empty_old, index(["a"], ["A"]))) == {"added": 1, "changed": 0, "unchanged": 0,
                                                                   "deleted": 0}
    gone = diff(index(["a", "b"], ["A", "B"], "f1"), index([], []))
    assert gone["change"].to_pylist() == ["deleted", "deleted"]


def test_split_by_changes_embeds_added_and_changed_and_carries_the_rest():
    table = docs(["a", "b", "c"], ["A", "B2", "C"])
    changes = diff(index(["a", "b"], ["A", "B"], "f1"), index(["a", "b", "c"], ["A", "B2", "C"]))
    embed, carry = split_by_changes(table, content_hashes(table, []), changes)
    assert embed["id"].to_pylist() == ["b", "c"]
    assert carry.to_pylist() == [{"row": 0, "old_fragment": "f1", "old_row": 0}]
    edited_since = docs(["a", "b", "c"], ["A?", "B2", "C"])  # the shard changed after it was compared
    with pytest.raises(InputError, match="changed while this run was reading it"):
        split_by_changes(edited_since, content_hashes(edited_since, []), changes)


def snapshot(version, fragments):
    records = [CommitRecord(f, "s", 0, 1, [f"data/{f}.parquet"], 1, 1, 0, 0, 1, 1, 0.0) for f in fragments]
    return Snapshot(version, "fp", "incremental", {}, {}, records)


def test_gc_drops_old_versions_and_only_the_fragments_no_kept_version_lists():
    snaps = [snapshot(1, ["a", "b"]), snapshot(2, ["a", "c"]), snapshot(3, ["a", "d"])]
    kept_two = collectable(snaps, keep=2)
    assert kept_two.versions == [1] and [r.fragment for r in kept_two.fragments] == ["b"]
    kept_one = collectable(snaps, keep=1)
    assert kept_one.versions == [1, 2] and [r.fragment for r in kept_one.fragments] == ["b", "c"]
    assert collectable(snaps, keep=5).versions == []


def test_diff_shard_writes_its_changes_once_and_handles_empty_and_broken_shards(tmp_path):
    import gzip

    import pyarrow.parquet as pq

    from pipeline.config import InputConfig
    from pipeline.incremental import DiffTask, diff_shard
    from pipeline.sources import list_shards

    corpus = tmp_path / "in"
    corpus.mkdir()
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
                   corpus / "empty.parquet")
    (corpus / "two.jsonl").write_text('{"id": "a", "text": "A"}\n\n{"id": "b", "text": "B"}\n')
    (corpus / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"id": "x", "text": "X"}\n' * 40)[:30])
    cfg, out = InputConfig(uri=str(corpus)), str(tmp_path / "out")
    results = {}
    for shard in list_shards(cfg):
        task = DiffTask(shard.source, shard, (), f"changes/{shard.source}.parquet")
        results[shard.source] = diff_shard(task, cfg, out)
    assert results["empty.parquet"] == {"source": "empty.parquet", "added": 0, "changed": 0, "unchanged": 0,
                                        "deleted": 0, "rows": 0, "error": ""}
    assert (results["two.jsonl"]["added"], results["two.jsonl"]["rows"]) == (2, 3)  # a blank line is a row
    assert results["cut.jsonl.gz"]["error"].startswith("cannot read shard cut.jsonl.gz")
    written = (tmp_path / "out" / "changes" / "two.jsonl.parquet").stat().st_mtime_ns
    again = diff_shard(DiffTask("two.jsonl", list_shards(cfg)[-1], (), "changes/two.jsonl.parquet"), cfg, out)
    assert again == results["two.jsonl"]  # a resumed run reuses the diff of the same shard version
    assert (tmp_path / "out" / "changes" / "two.jsonl.parquet").stat().st_mtime_ns == written
    (corpus / "two.jsonl").write_text('{"id": "a", "text": "A"}\n')  # edited again before the rerun
    edited = diff_shard(DiffTask("two.jsonl", list_shards(cfg)[-1], (), "changes/two.jsonl.parquet"), cfg, out)
    assert (edited["added"], edited["rows"]) == (1, 1)
