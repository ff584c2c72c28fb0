"""What changed in a shard since the previous output version: per-document content hashes, the
hash index a fragment leaves behind, and the diff of a shard against the previous index.

A document is keyed by its id and the occurrence of that id in its shard (0, or 1, 2, ... for
a duplicate id); its content hash covers the text and every kept field, i.e. all that shapes
its output rows. Against the previous version of the same shard a document is

    unchanged  same key, same hash: its rows are copied forward, not embedded again
    changed    same key, other hash: embedded anew
    added      a key the previous version lacks: embedded
    deleted    a key only the previous version has: absent from the new version

Pure functions over Arrow tables. The caller works one shard at a time, so memory is bounded
by the largest shard, never by the corpus.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

HASH = pa.binary(16)
INDEX_SCHEMA = pa.schema([("id", pa.string()), ("hash", HASH), ("row", pa.int64())])
CHANGES_SCHEMA = pa.schema([("id", pa.string()), ("row", pa.int64()), ("hash", HASH), ("change", pa.string()),
                            ("old_fragment", pa.string()), ("old_row", pa.int64())])
KINDS = ("added", "changed", "unchanged", "deleted")
EMBEDDED = ("added", "changed")  # the changes that need the model


def content_hashes(docs: pa.Table, keep_fields: list[str]) -> pa.Array:
    """(N,) 16-byte BLAKE2b digests of each document's text (or given words) and kept fields."""
    texts = docs["text"].to_pylist()
    kept = [docs[name].to_pylist() for name in keep_fields]
    digests = []
    for i, text in enumerate(texts):
        content = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)  # words: a JSON list
        digest = hashlib.blake2b(content.encode(), digest_size=16)
        if kept:
            digest.update(b"\0" + json.dumps([column[i] for column in kept], sort_keys=True, default=str).encode())
        digests.append(digest.digest())
    return pa.array(digests, HASH)


def index_table(ids: pa.Array, hashes: pa.Array, rows: pa.Array) -> pa.Table:
    """A fragment's hash index: one entry per document in its data, sorted by id."""
    table = pa.Table.from_arrays([ids, hashes, rows], schema=INDEX_SCHEMA)
    return table.sort_by([("id", "ascending"), ("row", "ascending")])


def diff(old: pa.Table, new: pa.Table) -> pa.Table:
    """Changes of one shard. old: id, hash, row, fragment (the previous version's index);
    new: id, hash, row (this version's documents). Returns CHANGES_SCHEMA rows: this version's
    documents by row, then the deleted ones (row null); old_fragment/old_row say where a
    document's previous rows are."""
    old = _with_occurrence(old.select(["id", "hash", "row", "fragment"])).rename_columns(
        ["id", "old_hash", "old_row", "old_fragment", "occurrence"])
    new = _with_occurrence(new.select(["id", "hash", "row"]))
    joined = new.join(old, keys=["id", "occurrence"], join_type="full outer")
    in_new = pc.is_valid(joined["row"]).to_numpy(zero_copy_only=False)
    in_old = pc.is_valid(joined["old_row"]).to_numpy(zero_copy_only=False)
    same = pc.fill_null(pc.equal(joined["hash"], joined["old_hash"]), False).to_numpy(zero_copy_only=False)
    change = np.select([~in_new, ~in_old, same], ["deleted", "added", "unchanged"], "changed")
    table = pa.table({
        "id": joined["id"], "row": joined["row"], "hash": joined["hash"], "change": pa.array(change, pa.string()),
        "old_fragment": joined["old_fragment"], "old_row": joined["old_row"],
    }).cast(CHANGES_SCHEMA)
    return table.sort_by([("row", "ascending"), ("id", "ascending")])  # nulls (deleted) last


def _with_occurrence(table: pa.Table) -> pa.Table:
    """Adds `occurrence`: how many earlier rows of the table share the row's id."""
    table = table.sort_by([("id", "ascending"), ("row", "ascending")])
    n = table.num_rows
    first = np.ones(n, dtype=bool)
    if n > 1:
        ids = table["id"].combine_chunks()
        first[1:] = pc.not_equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    run_start = np.maximum.accumulate(np.where(first, np.arange(n), 0)) if n else np.zeros(0, np.int64)
    return table.append_column("occurrence", pa.array(np.arange(n) - run_start, pa.int64()))


def count_changes(changes: pa.Table) -> dict[str, int]:
    counted = {kind: 0 for kind in KINDS}
    for entry in pc.value_counts(changes["change"]).to_pylist():
        counted[entry["values"]] = entry["counts"]
    return counted
