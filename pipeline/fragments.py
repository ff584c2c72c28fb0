"""The work unit: fragments (shard, row range), cut by the read step as it streams a shard,
and how a fragment's tables travel between pipeline stages.

Fragment k of a shard holds rows [k·F, (k+1)·F) (F = batching.fragment_docs); the shard's last
fragment holds what is left, and says it is last. A fragment's id depends only on its shard's
relative path, its row range and a salt (the shard's version, the settings and the output
version the fragment belongs to), so the same input always cuts the same fragments and a
retried fragment rewrites the same file names, while an edited shard or a new version never
reuses the name of a file an older version reads. Nothing counts a shard's rows beforehand:
the driver learns a shard's fragments from their commit records, and which shards are still
to read from them (`own_records`, `finished`, `to_read`: Arrow over the listing, Python only
over the records).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.manifest import CommitRecord
from pipeline.sources import Shard

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Fragment:
    id: str
    shard: Shard
    start: int  # first row, inclusive
    end: int  # last row, exclusive
    last: bool = False  # the shard's last fragment (it ends where the shard does)

    @property
    def rows(self) -> int:
        return self.end - self.start

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Fragment":
        raw = json.loads(text)
        return cls(raw["id"], Shard(**raw["shard"]), raw["start"], raw["end"], raw.get("last", False))


def fragment_id(source: str, start: int, end: int, salt: str = "") -> str:
    """Readable, path-safe and unique: `<shard stem>-<start>-<hash of source, range and salt>`."""
    digest = hashlib.sha256(f"{source}\0{start}\0{end}\0{salt}".encode()).hexdigest()[:12]
    return f"{safe_stem(source)}-{start:09d}-{digest}"


def shard_failure_id(source: str) -> str:
    """The id a failure record of a whole shard (or its rest) goes by."""
    return "shard-" + hashlib.sha256(source.encode()).hexdigest()[:12]


def safe_stem(source: str) -> str:
    """A shard's file name as a path-safe word, for the names of files made from it."""
    return _UNSAFE.sub("_", source.rsplit("/", 1)[-1]).strip("._")[:40] or "shard"


def cut(shard: Shard, start: int, end: int, last: bool, salt: str = "") -> Fragment:
    """The fragment of rows [start, end) of a shard. The shard's version joins `salt` (the
    settings and output version) in the id: an edited shard gets new fragments."""
    return Fragment(fragment_id(shard.source, start, end, f"{shard.version}\0{salt}"), shard, start, end, last)


def own_records(work: pa.Table, salt: str, records: list[CommitRecord]) -> list[CommitRecord]:
    """The records that are fragments of this work (`sources.SHARD_SCHEMA` rows): of a shard it
    holds, cut from the same shard version, with the same `salt` (settings and output version:
    their ids say so)."""
    if not records or not work.num_rows:
        return []
    table = pa.table({"i": pa.array(range(len(records)), pa.int64()),
                      "source": pa.array([r.source for r in records], pa.string()),
                      "version": pa.array([r.shard_version for r in records], pa.string())})
    matched = table.join(work.select(["source", "version"]), ["source", "version"], join_type="inner")
    candidates = [records[i] for i in sorted(matched["i"].to_pylist())]
    return [r for r in candidates
            if r.fragment == cut(Shard("", r.source, "", None, 0, r.shard_version), r.start, r.end, r.last, salt).id]


def finished(records: list[CommitRecord]) -> set[str]:
    """The shards that their committed fragments cover: every fragment from row 0 up to the one
    marked last is committed."""
    by_source: dict[str, list[CommitRecord]] = {}
    for record in records:
        by_source.setdefault(record.source, []).append(record)
    done = set()
    for source, group in by_source.items():
        group.sort(key=lambda r: r.start)
        if group[0].start == 0 and group[-1].last and all(a.end == b.start for a, b in zip(group, group[1:])):
            done.add(source)
    return done


def unfinished(work: pa.Table, records: list[CommitRecord]) -> list[str]:
    """The shards of `work` (sorted sources) that `records` do not cover yet."""
    done = pa.array(sorted(finished(records)), pa.string())
    return work["source"].filter(pc.invert(pc.is_in(work["source"], done))).to_pylist()


def to_read(work: pa.Table, own: list[CommitRecord], failed: dict[str, set[int]] | None = None) -> pa.Table:
    """The shards of `work` still to read, with `skip`: the starting rows of their fragments
    committed already, and of the `failed` ones (source -> starts: fragments that kill their
    worker, stepped over so the rest of the shard is still embedded). A shard whose fragments
    are all committed is left out. Arrow kernels over the listing; Python only over the records."""
    done = finished(own)
    todo = work.filter(pc.invert(pc.is_in(work["source"], pa.array(sorted(done), pa.string())))) if done else work
    starts: dict[str, set[int]] = {source: set(rows) for source, rows in (failed or {}).items() if source not in done}
    for record in own:
        if record.source not in done:
            starts.setdefault(record.source, set()).add(record.start)
    if not starts:
        return todo.append_column("skip", pa.nulls(todo.num_rows, pa.list_(pa.int64())))
    partial = pa.table({"source": pa.array(list(starts), pa.string()), "k": pa.array(range(len(starts)), pa.int64())})
    todo = todo.join(partial, "source", join_type="left outer")  # Acero joins no list columns: join an index
    todo = todo.take(pc.sort_indices(todo["source"]))
    skip = pa.array([sorted(v) for v in starts.values()], pa.list_(pa.int64())).take(todo["k"])
    return todo.drop_columns(["k"]).append_column("skip", skip)


def table_to_bytes(table: pa.Table) -> bytes:
    """Arrow IPC stream: how a fragment's tables cross from one Ray stage to the next."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def table_from_bytes(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
