"""The work unit: fragments (shard, row range), cut by the read step as it streams a shard,
and how a fragment's tables travel between pipeline stages.

Fragment k of a shard holds rows [k·F, (k+1)·F) (F = batching.fragment_docs); the shard's last
fragment holds what is left, and says it is last. A fragment's id depends only on its shard's
relative path, its row range and a salt (the shard's version, the settings and the output
version the fragment belongs to), so the same input always cuts the same fragments and a
retried fragment rewrites the same file names, while an edited shard or a new version never
reuses the name of a file an older version reads. Nothing counts a shard's rows beforehand:
the driver learns a shard's fragments from their commit records.
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


def table_to_bytes(table: pa.Table) -> bytes:
    """Arrow IPC stream: how a fragment's tables cross from one Ray stage to the next."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def table_from_bytes(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
