"""The four pipeline steps as plain Python over one fragment payload each:

    read (shard → fragments' rows) → tokenize → embed → write + commit

A payload is a flat dict of a fragment's JSON, its tables as Arrow IPC bytes and a few
counters, so Ray Data can carry it as one row. Nothing here imports Ray: `ray_pipeline.py`
wires these steps into a Ray Data dataset, and tests call them directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import InputConfig
from pipeline.embedder import Embedder, EmbedSettings
from pipeline.fragments import Fragment, table_from_bytes, table_to_bytes
from pipeline.manifest import CommitRecord, Manifest
from pipeline.output import output_table, parquet_bytes, partition_files, quarantine_table, row_table
from pipeline.sources import Shard, read_ranges
from pipeline.storage import Location
from pipeline.tokenize import TextTokenizer, TokenWindows


@dataclass(frozen=True)
class JobSpec:
    """Everything the steps need, resolved on the driver and shipped to the workers."""

    input: InputConfig
    embed: EmbedSettings
    output_uri: str
    partition_by: str
    file_metadata: dict[str, str]
    stride: int | None = None  # sliding-window overlap; None = truncate


def read_shard(shard: Shard, fragments: list[Fragment], cfg: InputConfig) -> Iterator[dict]:
    """One payload per fragment of this shard, reading the shard once."""
    fs, _ = fsspec.core.url_to_fs(cfg.uri)
    started = time.time()
    ranges = [(f.start, f.end) for f in fragments]
    for fragment, rows in zip(sorted(fragments, key=lambda f: f.start), read_ranges(fs, shard, ranges, cfg)):
        yield {
            "fragment": fragment.to_json(),
            "docs": table_to_bytes(rows.docs),
            "quarantine": table_to_bytes(quarantine_table(rows.quarantine)),
            "blank": rows.blank,
            "started": started,
        }
        started = time.time()


class Tokenize:
    """Replaces the text column by n_tokens and truncated, and adds the fragment's windows."""

    def __init__(self, model_path: str, max_length: int, stride: int | None, details: bool):
        self.tokenizer = TextTokenizer(model_path, max_length, stride, details)

    def __call__(self, payload: dict) -> dict:
        docs = table_from_bytes(payload["docs"])
        windows = self.tokenizer.encode(docs["text"].to_pylist())
        docs = docs.drop_columns(["text"])
        docs = docs.append_column("n_tokens", pa.array(windows.n_tokens, pa.int32()))
        docs = docs.append_column("truncated", pa.array(windows.truncated, pa.bool_()))
        return {**payload, "docs": table_to_bytes(docs), "windows": table_to_bytes(windows.to_table())}


class Embed:
    """Adds the output vectors; the payload's docs become the output rows."""

    def __init__(self, settings: EmbedSettings, keep_fields: list[str]):
        self.embedder = Embedder(settings)
        self.keep_fields = keep_fields

    def __call__(self, payload: dict) -> dict:
        docs = table_from_bytes(payload["docs"])
        windows = TokenWindows.from_table(table_from_bytes(payload["windows"]), docs["n_tokens"].to_numpy(),
                                          docs["truncated"].to_numpy(zero_copy_only=False))
        result = self.embedder.embed(windows)
        rows = output_table(row_table(docs, windows, self.embedder.settings.window_rows, self.keep_fields), result)
        return {**payload, "docs": table_to_bytes(rows), "windows": b"", "embedded": docs.num_rows,
                "padded_tokens": result.padded_tokens}


def write_fragment(payload: dict, job: JobSpec) -> CommitRecord:
    """Write the data files, then the quarantine file, then the commit record (last)."""
    fragment = Fragment.from_json(payload["fragment"])
    location = Location.from_uri(job.output_uri)
    rows = table_from_bytes(payload["docs"])
    files = []
    for path, part in partition_files(rows, job.partition_by, fragment.id):
        location.write_bytes(parquet_bytes(part, job.file_metadata), path)
        files.append(path)
    quarantine = table_from_bytes(payload["quarantine"])
    quarantine_file = None
    if quarantine.num_rows:
        quarantine_file = f"quarantine/{fragment.id}.parquet"
        location.write_bytes(parquet_bytes(quarantine), quarantine_file)
    record = CommitRecord(
        fragment=fragment.id,
        source=fragment.shard.source,
        start=fragment.start,
        end=fragment.end,
        files=files,
        rows=fragment.rows,
        docs=int(payload["embedded"]),
        quarantined=quarantine.num_rows,
        blank=int(payload["blank"]),
        tokens=int(pc.sum(rows["n_tokens"]).as_py() or 0),
        padded_tokens=int(payload.get("padded_tokens", 0)),
        seconds=round(time.time() - float(payload["started"]), 3),
        quarantine_file=quarantine_file,
    )
    Manifest(location).commit(record)
    return record
