"""Corpus shards: find them under `input.uri`, count their rows, read row ranges as Arrow tables.

A shard is one input file (JSONL, optionally .gz/.zst; Parquet; plain text with one document
per line). Rows are numbered from 0 inside a shard: lines for JSONL and text, table rows for
Parquet. Whitespace-only lines are not documents; they are counted as `blank`, never embedded.
A row that cannot become a document goes to quarantine with a reason, never silently away.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import re
import stat
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

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
    local = isinstance(fs, LocalFileSystem)
    for info in infos:
        name = info["name"]
        kind = _local_kind(name) if local else info.get("type")
        if kind == "directory":
            continue
        rel = posixpath.relpath(name, base) if base not in ("", ".") else name
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue  # hidden files, _SUCCESS markers, ...
        fmt, compression = detect_format(name, cfg.format)
        if fmt is None or kind == "other":
            if skipped is not None:
                skipped.append(printable(rel) + (" (not a regular file)" if fmt and kind == "other" else ""))
            continue
        shards.append(Shard(name, printable(rel), fmt, compression, int(info.get("size") or 0), file_version(info)))
    if not shards:
        raise InputError(
            f"input.uri {cfg.uri!r} holds no corpus files (.jsonl[.gz|.zst], .parquet, .txt); "
            "check the path or set input.format"
        )
    return sorted(shards, key=lambda s: s.source)


def _local_kind(path: str) -> str:
    """file | directory | other (a FIFO, socket or device, which would block or never end: not
    a shard) | missing (a broken symlink: a shard that fails with its reason), after symlinks."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # gone, a symlink loop, a permission problem: reading it says why
        return "missing"
    return "file" if stat.S_ISREG(mode) else "directory" if stat.S_ISDIR(mode) else "other"


def printable(name: str) -> str:
    """A file name as text that every writer accepts: bytes that are not UTF-8 (which Python
    keeps as lone surrogates) become `\\xff` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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


@contextlib.contextmanager
def open_shard(fs: fsspec.AbstractFileSystem, shard: Shard) -> Iterator[io.BufferedIOBase]:
    """A shard's bytes, decompressed: `read` and iteration by line work for every compression
    (zstd streams are read across frames, as `zstd -d` does, and buffered so lines can be iterated)."""
    if shard.compression != "zstd":
        with fs.open(shard.path, "rb", compression=shard.compression) as f:
            yield f
        return
    import zstandard

    with fs.open(shard.path, "rb") as raw:
        with io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True),
                               buffer_size=1 << 20) as f:
            yield f


def count_rows(fs: fsspec.AbstractFileSystem, shard: Shard) -> int:
    """Rows in a shard: lines for JSONL/text (a last line without newline counts), rows for Parquet."""
    try:
        if shard.format == "parquet":
            with fs.open(shard.path, "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows
        lines, last = 0, b"\n"
        with open_shard(fs, shard) as f:
            while chunk := f.read(1 << 22):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
        return lines + (last != b"\n")
    except Exception as exc:  # noqa: BLE001 - any failure means the shard is unreadable
        raise InputError(f"cannot read shard {shard.source}: {exc}") from None


def keep_schema(fs: fsspec.AbstractFileSystem, shards: list[Shard], cfg: InputConfig) -> pa.Schema:
    """The type of every kept field in the output: its type in the first shard (by source),
    so that every data file of an output shares one schema whatever the other shards hold.

    Parquet gives its column's type (dictionaries as their values, large types as plain ones, a
    column of nulls or a field the shard lacks as string); JSONL and text give strings (numbers,
    lists and objects as JSON text). A first shard whose footer cannot be read passes the choice on.
    """
    for shard in shards[:16] if cfg.keep_fields else []:
        if shard.format != "parquet":
            break
        try:
            with fs.open(shard.path, "rb") as f:
                schema = pq.read_schema(f)
        except Exception:  # noqa: BLE001 - an unreadable shard fails later, with its reason
            continue
        return pa.schema([(name, _storable(schema.field(name).type) if name in schema.names else pa.string())
                          for name in cfg.keep_fields])
    return pa.schema([(name, pa.string()) for name in cfg.keep_fields])


def _storable(kind: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(kind):
        return _storable(kind.value_type)
    if pa.types.is_null(kind):
        return pa.string()
    return {pa.large_string(): pa.string(), pa.large_binary(): pa.binary()}.get(kind, kind)


def read_ranges(
    fs: fsspec.AbstractFileSystem, shard: Shard, ranges: list[tuple[int, int]], cfg: InputConfig,
    kept: pa.Schema | None = None,
) -> Iterator[FragmentRows]:
    """Yield one FragmentRows per (start, end) row range, in order, reading the shard once.
    Kept fields take the types of `kept` (see `keep_schema`; strings when None)."""
    ranges = sorted(ranges)
    kept_types = {name: pa.string() for name in cfg.keep_fields}
    kept_types.update({f.name: f.type for f in kept or []})
    if shard.format == "parquet":
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
    with open_shard(fs, shard) as f:
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
    except RecursionError:
        return "JSON nested too deep to read (about 1,000 levels or more)"
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
            for record in _batch_records(batch):
                yield row, record
                row += 1
            if row >= stop:
                return


def _batch_records(batch: pa.RecordBatch) -> list[object]:
    """A Parquet batch as record dicts; a row holding a string that is not valid UTF-8 (Parquet
    writers do not all check) becomes the reason it cannot be a document."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        pass
    records: list[object] = [{} for _ in range(batch.num_rows)]
    for name, column in zip(batch.schema.names, batch.columns):
        try:
            values = column.to_pylist()
        except UnicodeDecodeError:
            values = [_utf8_or_reason(name, column.slice(i, 1)) for i in range(len(column))]
        for i, value in enumerate(values):
            if isinstance(records[i], dict):
                records[i] = value if isinstance(value, _Invalid) else {**records[i], name: value}
    return [str(r) if isinstance(r, _Invalid) else r for r in records]


class _Invalid(str):
    """Why a value cannot be read (in place of the value)."""


def _utf8_or_reason(name: str, one: pa.Array) -> object:
    try:
        return one.to_pylist()[0]
    except UnicodeDecodeError as exc:
        return _Invalid(f"{name!r} is not valid UTF-8 (byte {exc.start} of a string)")


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
        if value is None:
            return f"{self.shard.source}#{row}"
        # numbers as written; booleans, lists and objects as JSON text, as kept fields are
        return value if isinstance(value, str) else str(value) if isinstance(value, (int, float)) and \
            not isinstance(value, bool) else json.dumps(value, default=str)

    def _quarantine(self, doc_id: str, row: int, reason: str, text: str) -> None:
        self.out.quarantine.append(
            {"id": doc_id, "source": self.shard.source, "row": row, "reason": reason,
             "text": text[:QUARANTINE_TEXT_CHARS]}
        )

    def finish(self) -> FragmentRows:
        try:
            self.out.docs = self._table()
        except (UnicodeEncodeError, pa.ArrowException, TypeError, ValueError, OverflowError, RecursionError):
            self._quarantine_unstorable()  # find the rows at fault; the happy path never loops over rows
            self.out.docs = self._table()
        return self.out

    def _table(self) -> pa.Table:
        columns = {
            "id": pa.array(self.ids, pa.string()),
            "source": pa.array([self.shard.source] * len(self.ids), pa.string()),
            "row": pa.array(self.rows, pa.int64()),
            "text": pa.array(self.texts, pa.string()),
        }
        for name, values in self.kept.items():
            columns[name] = kept_array(values, self.kept_types[name])
        return pa.table(columns)

    def _quarantine_unstorable(self) -> None:
        """Quarantine each document holding a value Arrow cannot store: a string with a lone
        surrogate (JSON's `\\ud800` escape), or a kept value of another type than the output's."""
        keep = []
        for i, (doc_id, row, text) in enumerate(zip(self.ids, self.rows, self.texts)):
            problem = _unicode_problem("id", doc_id) or _unicode_problem(self.cfg.text_field, text) or next(
                (p for name, values in self.kept.items() if (p := _kept_problem(name, values[i], self.kept_types[name]))),
                None)
            if problem:
                self._quarantine(doc_id, row, problem, text)
            else:
                keep.append(i)
        self.ids, self.rows, self.texts = ([values[i] for i in keep] for values in (self.ids, self.rows, self.texts))
        self.kept = {name: [values[i] for i in keep] for name, values in self.kept.items()}


def _unicode_problem(name: str, text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{name!r} holds a lone surrogate (\\u{ord(text[exc.start]):04x} at character {exc.start}), not valid Unicode"
    return None


def _kept_problem(name: str, value: object, kind: pa.DataType) -> str | None:
    try:
        kept_array([value], kind)
    except UnicodeEncodeError as exc:
        return f"kept field {name!r} holds a lone surrogate at character {exc.start}, not valid Unicode"
    except RecursionError:
        return f"kept field {name!r} is nested too deep to store"
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        shown = json.dumps(value, default=str, ensure_ascii=True)
        return (f"kept field {name!r} is {shown[:60]}{'...' if len(shown) > 60 else ''}, which is not a {kind} "
                "(the output's type of that field, from the first shard; see keep_types in _manifest/run.json)")
    return None


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


def kept_array(values: list, kind: pa.DataType) -> pa.Array:
    """A kept field's values as the output's type of that field (see `keep_schema`).

    Into a string field go strings as they are and anything else as JSON text (numbers, lists,
    objects), so JSONL's mixed values still fit one schema; into another type values convert as
    Arrow converts them (`"3"` into an integer field is 3). Raises what Arrow raises for a value
    that does not fit.
    """
    if pa.types.is_string(kind):
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string())
    try:
        return pa.array(values, kind)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):  # values of mixed types: one by one
        return pa.concat_arrays([_converted(value, kind) for value in values]) if values else pa.array([], kind)


def _converted(value: object, kind: pa.DataType) -> pa.Array:
    try:
        return pa.array([value], kind)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return pc.cast(pa.array([value]), kind)
