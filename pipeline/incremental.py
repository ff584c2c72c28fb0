"""The storage side of incremental versions, as plain steps the Ray adapter runs:

    diff_shard      one changed (or deleted) shard against the previous version's hash index:
                    writes the shard's changes file, returns the counts
    split_by_changes  a fragment's documents: those to embed, and the unchanged ones to carry
    carried_rows    the carried documents' rows, copied from the older version's data files

Each works on one shard or one fragment, so no process ever holds more than a shard's index.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.changes import CHANGES_SCHEMA, EMBEDDED, INDEX_SCHEMA, content_hashes, count_changes, diff, index_table
from pipeline.config import InputConfig, StorageConfig
from pipeline.errors import InputError, OutputError, one_line
from pipeline.fragments import safe_stem
from pipeline.manifest import HASHES_DIR, Manifest
from pipeline.output import parquet_bytes
from pipeline.sources import Shard, read_fragments
from pipeline.storage import Location, open_fs

DIFF_CHUNK_ROWS = 4096  # rows read at a time while hashing a shard
COUNTS_KEY = "strata.changes"


@dataclass(frozen=True)
class DiffTask:
    source: str
    shard: Shard | None  # None: the shard is gone from the input
    old_fragments: tuple[str, ...]  # the previous version's fragments of this shard
    changes_file: str  # where its changes go, relative to the output root
    old_hashes: tuple[str, ...] = ()  # their hash index files (manifest.hash_file_of); () for by id


def changes_name(source: str) -> str:
    return f"{safe_stem(source)}-{hashlib.sha256(source.encode()).hexdigest()[:12]}.parquet"


def diff_shard(task: DiffTask, cfg: InputConfig, output_uri: str, storage: StorageConfig | None = None,
               kept: pa.Schema | None = None) -> dict:
    """Counts of added/changed/unchanged/deleted documents and the shard's rows, or an error
    saying why the shard could not be compared. A changes file already there (a resumed run)
    is reused when it was made from the same shard version: the diff of the same input against
    the same version is the same. A shard edited again since is compared anew."""
    location = Location.from_uri(output_uri, storage)
    shard_version = task.shard.version if task.shard else ""
    try:
        if location.exists(task.changes_file):
            with location.fs.open(location.path(task.changes_file), "rb") as f:
                done = json.loads(pq.read_schema(f).metadata[COUNTS_KEY.encode()])
            compared = done.pop("shard_version", "")
            if task.shard is None or (shard_version and compared == shard_version):
                return {"source": task.source, **done, "error": ""}
        old = _old_index(location, task.old_fragments, task.old_hashes)
        new, rows = _new_index(task.shard, cfg, storage, kept) if task.shard else (INDEX_SCHEMA.empty_table(), 0)
        changes = diff(old, new)
        counts = {**count_changes(changes), "rows": rows}
        metadata = {COUNTS_KEY: json.dumps({**counts, "shard_version": shard_version})}
        location.write_bytes(parquet_bytes(changes, metadata), task.changes_file)
    except Exception as exc:  # noqa: BLE001 - an unreadable shard fails this shard, not the run
        reason = str(exc) if isinstance(exc, (InputError, OutputError)) else one_line(exc)
        return {"source": task.source, "error": reason}
    return {"source": task.source, **counts, "error": ""}


def _old_index(location: Location, fragments: tuple[str, ...], hashes: tuple[str, ...] = ()) -> pa.Table:
    parts = []
    for fragment, path in zip(fragments, hashes or [f"{HASHES_DIR}/{f}.parquet" for f in fragments]):
        if not location.exists(path):
            raise OutputError(f"fragment {fragment} of the previous version has no hash index ({path}); it was "
                              "made by an older strata: embed into a new output.uri")
        with location.fs.open(location.path(path), "rb") as f:
            index = pq.ParquetFile(f).read()
        parts.append(index.append_column("fragment", pa.array([fragment] * index.num_rows, pa.string())))
    return pa.concat_tables(parts) if parts else INDEX_SCHEMA.empty_table().append_column(
        "fragment", pa.array([], pa.string()))


def _new_index(shard: Shard, cfg: InputConfig, storage: StorageConfig | None,
               kept: pa.Schema | None) -> tuple[pa.Table, int]:
    fs, _ = open_fs(cfg.uri, storage)
    parts, rows = [INDEX_SCHEMA.empty_table()], 0
    for _, rows, _, chunk in read_fragments(fs, shard, DIFF_CHUNK_ROWS, cfg, kept):
        parts.append(index_table(chunk.docs["id"], content_hashes(chunk.docs, cfg.keep_fields), chunk.docs["row"]))
    return pa.concat_tables(parts), rows


def read_changes(changes_uri: str, storage: StorageConfig | None) -> pa.Table:
    """A shard's changes, without the deleted documents: one entry per row of the new shard."""
    fs, path = open_fs(changes_uri, storage)
    with fs.open(path, "rb") as f:
        changes = pq.ParquetFile(f).read().cast(CHANGES_SCHEMA)
    return changes.filter(pc.not_equal(changes["change"], "deleted"))


def split_by_changes(docs: pa.Table, hashes: pa.Array, changes: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(documents to embed, carry: row, old_fragment, old_row of the unchanged ones). Refuses a
    document its shard's diff did not see as it is now: the shard changed during the run."""
    position = pc.index_in(docs["row"], changes["row"])
    picked = changes.take(position.fill_null(0)) if len(changes) else changes
    seen = position.null_count == 0 and len(docs) == len(picked) and \
        pc.all(pc.equal(picked["hash"], hashes)).as_py() is not False and picked["id"].equals(docs["id"])
    if not seen:
        raise InputError(f"shard {docs['source'][0].as_py()} changed while this run was reading it; rerun to compare "
                         "it again")
    embed = pc.is_in(picked["change"], pa.array(EMBEDDED))
    carry = pc.equal(picked["change"], "unchanged")
    carried = pa.table({"row": docs["row"].filter(carry), "old_fragment": picked["old_fragment"].filter(carry),
                        "old_row": picked["old_row"].filter(carry)})
    return docs.filter(embed), carried


def carried_rows(location: Location, carry: pa.Table, schema: pa.Schema) -> pa.Table:
    """The output rows of the carried documents (every window of each), read from the files of
    the fragments that hold them, renumbered to their rows in the current shard."""
    parts = []
    manifest = Manifest(location)
    for old_fragment in pc.unique(carry["old_fragment"]).to_pylist():
        wanted = carry.filter(pc.equal(carry["old_fragment"], old_fragment))
        for path in manifest.record(old_fragment).files:
            with location.fs.open(location.path(path), "rb") as f:
                table = pq.ParquetFile(f).read()
            table = table.filter(pc.is_in(table["row"], wanted["old_row"]))
            renumbered = wanted["row"].take(pc.index_in(table["row"], wanted["old_row"]))
            parts.append(table.set_column(table.schema.get_field_index("row"), "row", renumbered)
                         .select(schema.names).cast(schema))
    rows = pa.concat_tables(parts) if parts else schema.empty_table()
    found = pc.count_distinct(rows["row"]).as_py() if rows.num_rows else 0
    if found != carry.num_rows:
        raise OutputError(f"{carry.num_rows - found} unchanged documents have no rows in the previous version's files "
                          "(removed by hand?); rerun to embed them")
    return rows
