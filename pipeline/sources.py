"""Corpus shards: find them under `input.uri`, count their rows, read row ranges as Arrow tables.

A shard is one input file (JSONL, optionally .gz/.zst; Parquet; plain text with one document
per line). Rows are numbered from 0 inside a shard: lines for JSONL and text, table rows for
Parquet. Whitespace-only lines are not documents; they are counted as `blank`, never embedded.
A row that cannot become a document goes to quarantine with a reason, never silently away.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import InputConfig, StorageConfig
from pipeline.errors import InputError, one_line
from pipeline.storage import open_fs

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
QUARANTINE_TEXT_CHARS = 200
_VISIBLE = re.compile(r"[^\s\x00-\x1f\x7f]")  # a character a tokenizer does not strip away


@dataclass(frozen=True)
class Shard:
    path: str  # path inside the filesystem
    source: str  # relative to input.uri; the `source` column
    format: str  # jsonl | parquet | text
    compression: str | None
    size: int
    version: str = ""  # changes when the file does: size plus ETag (object storage) or mtime (local)


@dataclass
class FragmentRows:
    """What one row range of a shard holds: the documents to embed and what could not be."""

    docs: pa.Table  # id, source, row, text, keep_fields...
    quarantine: list[dict] = field(default_factory=list)  # id, source, row, reason, text
    blank: int = 0


def detect_format(name: str, declared: str) -> tuple[str | None, str | None]:
    """(format, compression) of a file; format None means "not a corpus file, skip it".

    With `auto` the extension decides; a declared format applies to every file found.
    """
    stem, ext = posixpath.splitext(name.lower())
    compression = COMPRESSIONS.get(ext)
    if compression:
        stem, ext = posixpath.splitext(stem)
    fmt = FORMATS.get(ext) if declared == "auto" else declared
    if fmt == "parquet" and compression:
        return None, compression  # parquet compresses inside the file
    return fmt, compression


def list_shards(cfg: InputConfig, storage: StorageConfig | None = None,
                skipped: list[str] | None = None) -> list[Shard]:
    """Every corpus file under input.uri (a file, a folder/prefix, or a glob), sorted by source.
    Files that are not corpus files are left out; their names go to `skipped` when given."""
    try:
        fs, path = open_fs(cfg.uri, storage)
        infos, base = _list(fs, path.rstrip("/") or "/")
    except Exception as exc:  # noqa: BLE001 - unreachable endpoint, no credentials, access denied, ...
        raise InputError(f"cannot list input.uri {cfg.uri!r}: {one_line(exc)}") from None
    if infos is None:
        raise InputError(f"input.uri {cfg.uri!r} does not exist (no such file, folder or prefix)")
    shards = []
    for info in infos:
        if info.get("type") == "directory":
            continue
        name = info["name"]
        rel = posixpath.relpath(name, base) if base not in ("", ".") else name
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue  # hidden files, _SUCCESS markers, ...
        fmt, compression = detect_format(name, cfg.format)
        if fmt is None:
            if skipped is not None:
                skipped.append(rel)
            continue
        shards.append(Shard(name, rel, fmt, compression, int(info.get("size") or 0), file_version(info)))
    if not shards:
        raise InputError(
            f"input.uri {cfg.uri!r} holds no corpus files (.jsonl[.gz|.zst], .parquet, .txt); "
            "check the path or set input.format"
        )
    return sorted(shards, key=lambda s: s.source)


def file_version(info: dict) -> str:
    """What changes when a file changes, from its listing alone: size plus the store's change
    marker (ETag on S3, generation or md5 on GCS, mtime on local disks and HDFS)."""
    for key in ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "last_modified"):
        if info.get(key) not in (None, ""):
            return f"{info.get('size')}:{info[key]}"
    return ""  # a store that says nothing: changes go unnoticed, as before


def _list(fs: fsspec.AbstractFileSystem, path: str) -> tuple[list[dict] | None, str]:
    """(file infos, the folder sources are relative to) of a glob, a folder/prefix or a file;
    None when nothing is there."""
    if fsspec.core.has_magic(path):
        return [fs.info(p) for p in fs.glob(path)], _glob_base(path)
    if fs.isdir(path):
        return list(fs.find(path, detail=True).values()), path
    if fs.exists(path):
        return [fs.info(path)], posixpath.dirname(path)
    return None, path


def _glob_base(pattern: str) -> str:
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if fsspec.core.has_magic(part):
            return "/".join(parts[:i])
    return posixpath.dirname(pattern)


def count_rows(fs: fsspec.AbstractFileSystem, shard: Shard) -> int:
    """Rows in a shard: lines for JSONL/text (a last line without newline counts), rows for Parquet."""
    try:
        if shard.format == "parquet":
            with fs.open(shard.path, "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows
        lines, last = 0, b"\n"
        with fs.open(shard.path, "rb", compression=shard.compression) as f:
            while chunk := f.read(1 << 22):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
        return lines + (last != b"\n")
    except Exception as exc:  # noqa: BLE001 - any failure means the shard is unreadable
        raise InputError(f"cannot read shard {shard.source}: {exc}") from None


def read_ranges(
    fs: fsspec.AbstractFileSystem, shard: Shard, ranges: list[tuple[int, int]], cfg: InputConfig
) -> Iterator[FragmentRows]:
    """Yield one FragmentRows per (start, end) row range, in order, reading the shard once."""
    ranges = sorted(ranges)
    kept_types: dict[str, pa.DataType] = {}
    if shard.format == "parquet":
        with fs.open(shard.path, "rb") as f:
            schema = pq.read_schema(f)
        kept_types = {n: schema.field(n).type for n in cfg.keep_fields if n in schema.names}
        records = _parquet_records(fs, shard, cfg, ranges[-1][1])
    else:
        records = _line_records(fs, shard)
    upcoming = next(records, None)
    for start, end in ranges:
        builder = _Builder(shard, cfg, kept_types)
        while upcoming is not None and upcoming[0] < end:
            row, record = upcoming
            if row >= start:
                builder.add(row, record)
            upcoming = next(records, None)
        if builder.seen != end - start:  # never let rows vanish: counts must reconcile
            raise InputError(f"shard {shard.source} ended after {start + builder.seen} rows, but {end} were "
                             "planned: it changed or was cut short since the run was planned")
        yield builder.finish()
    records.close()


def texts_at(cfg: InputConfig, wanted: list[tuple[str, int, str]], storage: StorageConfig | None = None
             ) -> dict[tuple[str, int], str]:
    """The texts at (source, row) that still hold document `id`, reading each shard once; a row
    whose shard is gone, unreadable, or holds another document since is left out."""
    by_source: dict[str, dict[int, str]] = {}
    for source, row, doc_id in wanted:
        by_source.setdefault(source, {})[row] = doc_id
    shards = {shard.source: shard for shard in list_shards(cfg, storage)}
    fs, _ = open_fs(cfg.uri, storage)
    texts = {}
    for source, rows in by_source.items():
        if source not in shards:
            continue
        try:
            for part in read_ranges(fs, shards[source], [(row, row + 1) for row in rows], cfg):
                for doc_id, row, text in zip(*(part.docs[c].to_pylist() for c in ("id", "row", "text"))):
                    if rows[row] == doc_id:
                        texts[(source, row)] = text
        except InputError:
            continue
    return texts


def _line_records(fs, shard: Shard) -> Iterator[tuple[int, bytes]]:
    """(row, raw line); lines are parsed only once they fall inside a wanted range."""
    with fs.open(shard.path, "rb", compression=shard.compression) as f:
        yield from enumerate(f)


def _parse_line(line: bytes, shard_format: str, text_field: str) -> object:
    """A line as a record dict, None for a blank line, or a string saying why it is bad."""
    if not line.strip():
        return None
    if shard_format == "text":
        return _decode_text_line(line, text_field)
    return _parse_json_line(line)


def _decode_text_line(line: bytes, text_field: str) -> object:
    try:
        return {text_field: line.rstrip(b"\r\n").decode("utf-8")}
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 at byte {exc.start}"


def _parse_json_line(line: bytes) -> object:
    try:
        record = json.loads(line)
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 at byte {exc.start}"
    except ValueError as exc:
        return f"malformed JSON: {exc}"
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    return record


def _parquet_records(fs, shard: Shard, cfg: InputConfig, stop: int) -> Iterator[tuple[int, object]]:
    with fs.open(shard.path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        if cfg.text_field not in names:
            raise InputError(f"shard {shard.source} has no column {cfg.text_field!r} (input.text_field)")
        wanted = [c for c in dict.fromkeys([cfg.id_field, cfg.text_field, *cfg.keep_fields]) if c in names]
        row = 0
        for batch in pf.iter_batches(columns=wanted, batch_size=4096):
            for record in batch.to_pylist():
                yield row, record
                row += 1
            if row >= stop:
                return


class _Builder:
    """Collects the rows of one range and turns them into a FragmentRows."""

    def __init__(self, shard: Shard, cfg: InputConfig, kept_types: dict[str, pa.DataType]):
        self.shard, self.cfg, self.kept_types = shard, cfg, kept_types
        self.ids: list[str] = []
        self.rows: list[int] = []
        self.texts: list[str] = []
        self.kept: dict[str, list] = {name: [] for name in cfg.keep_fields}
        self.out = FragmentRows(docs=pa.table({}))
        self.seen = 0  # rows of the range met so far

    def add(self, row: int, record: object) -> None:
        self.seen += 1
        if isinstance(record, bytes):
            record = _parse_line(record, self.shard.format, self.cfg.text_field)
        if record is None:
            self.out.blank += 1
            return
        doc_id = self._doc_id(row, record)
        if isinstance(record, str):
            self._quarantine(doc_id, row, record, "")
            return
        text = record.get(self.cfg.text_field)
        problem = _text_problem(text, self.cfg.text_field, self.cfg.text_field in record)
        if problem:
            self._quarantine(doc_id, row, problem, text if isinstance(text, str) else "")
            return
        self.ids.append(doc_id)
        self.rows.append(row)
        self.texts.append(text)
        for name, values in self.kept.items():
            values.append(record.get(name))

    def _doc_id(self, row: int, record: object) -> str:
        value = record.get(self.cfg.id_field) if isinstance(record, dict) else None
        return f"{self.shard.source}#{row}" if value is None else str(value)

    def _quarantine(self, doc_id: str, row: int, reason: str, text: str) -> None:
        self.out.quarantine.append(
            {"id": doc_id, "source": self.shard.source, "row": row, "reason": reason,
             "text": text[:QUARANTINE_TEXT_CHARS]}
        )

    def finish(self) -> FragmentRows:
        columns = {
            "id": pa.array(self.ids, pa.string()),
            "source": pa.array([self.shard.source] * len(self.ids), pa.string()),
            "row": pa.array(self.rows, pa.int64()),
            "text": pa.array(self.texts, pa.string()),
        }
        for name, values in self.kept.items():
            kept_type = self.kept_types.get(name)
            columns[name] = _kept_array(values) if kept_type is None else pa.array(values, kept_type)
        self.out.docs = pa.table(columns)
        return self.out


def has_visible_text(text: str) -> bool:
    """Whether a text holds a character the tokenizer keeps (not only whitespace or control characters)."""
    return bool(_VISIBLE.search(text))


def _text_problem(text: object, field_name: str, present: bool) -> str | None:
    if not present:
        return f"no {field_name!r} field"
    if text is None:
        return f"{field_name!r} is null"
    if not isinstance(text, str):
        return f"{field_name!r} is a {type(text).__name__}, not a string"
    if not text.strip():
        return f"{field_name!r} is empty or whitespace"
    if not has_visible_text(text):
        return f"{field_name!r} holds only whitespace and control characters (NUL, ...)"
    return None


def _kept_array(values: list) -> pa.Array:
    """A kept field from JSONL/text as strings (numbers, lists and objects as JSON text).

    One type whatever a fragment happens to hold, so every data file shares one schema.
    """
    return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string())
