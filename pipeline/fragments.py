"""The work unit: fragments (shard, row range) planned on the driver, and how a fragment's
tables travel between pipeline stages.

A fragment's id depends only on its shard's relative path and its row range, so the same input
always plans the same fragments and a retried fragment rewrites the same file names. The
driver keeps one small `Fragment` per work unit and never per-document state.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

import pyarrow as pa

from pipeline.sources import Shard

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Fragment:
    id: str
    shard: Shard
    start: int  # first row, inclusive
    end: int  # last row, exclusive

    @property
    def rows(self) -> int:
        return self.end - self.start

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Fragment":
        raw = json.loads(text)
        return cls(raw["id"], Shard(**raw["shard"]), raw["start"], raw["end"])


def fragment_id(source: str, start: int, end: int) -> str:
    """Readable, path-safe and unique: `<shard stem>-<start>-<hash of source and range>`."""
    stem = _UNSAFE.sub("_", source.rsplit("/", 1)[-1]).strip("._")[:40] or "shard"
    digest = hashlib.sha256(f"{source}\0{start}\0{end}".encode()).hexdigest()[:12]
    return f"{stem}-{start:09d}-{digest}"


def plan_fragments(shards_with_rows: list[tuple[Shard, int]], fragment_docs: int) -> list[Fragment]:
    """Cut every shard into consecutive row ranges of `fragment_docs` rows (the last may be shorter)."""
    fragments = []
    for shard, rows in shards_with_rows:
        for start in range(0, rows, fragment_docs):
            end = min(start + fragment_docs, rows)
            fragments.append(Fragment(fragment_id(shard.source, start, end), shard, start, end))
    return fragments


def table_to_bytes(table: pa.Table) -> bytes:
    """Arrow IPC stream: how a fragment's tables cross from one Ray stage to the next."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def table_from_bytes(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
