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
from typing import Iterable, Iterator

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
LISTING_PAGE = 100_000  # listed files turned into Arrow at a time
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


_WORD = pa.dictionary(pa.int8(), pa.string())  # a few distinct values: one byte per shard
SHARD_SCHEMA = pa.schema([("path", pa.binary()), ("source", pa.string()), ("format", _WORD),
                          ("compression", _WORD), ("size", pa.int64()), ("version", pa.string())])


def list_shards(cfg: InputConfig, storage: StorageConfig | None = None,
                skipped: list[str] | None = None) -> list[Shard]:
    """Every corpus file under input.uri as a `Shard`, sorted by source (see `shard_table`).
    For a few shards (tests, `strata search`); the driver of a run keeps the table."""
    return shards_of(shard_table(cfg, storage, skipped))


def shards_of(table: pa.Table) -> list[Shard]:
    return [Shard(**{**row, "path": row["path"].decode("utf-8", "surrogateescape")}) for row in table.to_pylist()]


def shard_table(cfg: InputConfig, storage: StorageConfig | None = None,
                skipped: list[str] | None = None) -> pa.Table:
    """Every corpus file under input.uri (a file, a folder/prefix, or a glob), one row each
    (`SHARD_SCHEMA`: path as the file system's bytes, source, format, compression, size, version),
    sorted by source. Files that are not corpus files are left out; their names go to `skipped`
    when given. Listing is all it does: no file is opened."""
    try:
        fs, path = open_fs(cfg.uri, storage)
        infos, base = _list(fs, path.rstrip("/") or "/")
    except Exception as exc:  # noqa: BLE001 - unreachable endpoint, no credentials, access denied, ...
        raise InputError(f"cannot list input.uri {cfg.uri!r}: {one_line(exc)}") from None
    if infos is None:
        raise InputError(f"input.uri {cfg.uri!r} does not exist (no such file, folder or prefix)")
    local = isinstance(fs, LocalFileSystem)
    pages = ([[info["name"] for info in page], [int(info.get("size") or 0) for info in page],
              [file_version(info) for info in page],
              [_local_kind(info["name"]) if local else info.get("type") or "file" for info in page]]
             for page in (infos[i:i + LISTING_PAGE] for i in range(0, len(infos), LISTING_PAGE)))
    table = select_listing(pages, base, cfg.format, skipped)
    if not table.num_rows:
        raise InputError(
            f"input.uri {cfg.uri!r} holds no corpus files (.jsonl[.gz|.zst], .parquet, .txt); "
            "check the path or set input.format"
        )
    return table


def select_listing(pages: Iterable[list[list]], base: str, declared: str = "auto",
                   skipped: list[str] | None = None) -> pa.Table:
    """`select_shards` over a listing that comes in pages ([names, sizes, versions, kinds]
    each), as object stores list (1,000 keys a request): Python objects live one page at a time,
    the result is one Arrow table sorted by source."""
    table = pa.concat_tables([select_shards(*page, base, declared, skipped) for page in pages] or
                             [SHARD_SCHEMA.empty_table()])
    return table if is_sorted(table["source"]) else table.take(pc.sort_indices(table["source"]))


def is_sorted(values: pa.ChunkedArray) -> bool:
    """Whether strings are in ascending order (listings mostly are: no copy to sort them then)."""
    chunks = [c for c in (values.chunks if isinstance(values, pa.ChunkedArray) else [values]) if len(c)]
    for i, chunk in enumerate(chunks):
        n = len(chunk)
        if n > 1 and pc.all(pc.less_equal(chunk.slice(0, n - 1), chunk.slice(1))).as_py() is False:
            return False
        if i and chunks[i - 1][-1].as_py() > chunk[0].as_py():
            return False
    return True


def select_shards(names: list[str], sizes: list[int], versions: list[str], kinds: list[str], base: str,
                  declared: str = "auto", skipped: list[str] | None = None) -> pa.Table:
    """The corpus files of a listing as a `SHARD_SCHEMA` table (in listing order), with Arrow
    kernels rather than a Python object per file (a listing may hold 10^7 files). `kinds`:
    file | directory | other (not a regular file) | missing; `base`: the folder sources are
    relative to. Hidden files and folders (`.x`, `_x`) are left out silently, other files that
    are not corpus files go to `skipped`."""
    try:
        name = pa.array(names, pa.string())
        source = name if base in ("", ".") else _relative(name, base)
        path = name.cast(pa.binary())
    except UnicodeEncodeError:  # a local name that is not UTF-8: kept as bytes to open, shown escaped
        path = pa.array([n.encode("utf-8", "surrogateescape") for n in names], pa.binary())
        source = pa.array([printable(n if base in ("", ".") else posixpath.relpath(n, base)) for n in names])
    kind = pa.array(kinds, pa.string())
    fmt, compression = _formats(pc.utf8_lower(source), declared)
    listed = pc.and_(pc.not_equal(kind, "directory"),
                     pc.invert(pc.match_substring_regex(source, r"(^|/)[._]")))
    wanted = pc.and_(pc.and_(listed, pc.is_valid(fmt)), pc.not_equal(kind, "other"))
    if skipped is not None:
        rest = pc.and_(listed, pc.invert(wanted))
        regular = pc.fill_null(pc.is_null(fmt), True)
        for rel, plain in zip(source.filter(rest).to_pylist(), regular.filter(rest).to_pylist()):
            skipped.append(rel + ("" if plain else " (not a regular file)"))
    return pa.table({"path": path, "source": source, "format": fmt.dictionary_encode().cast(_WORD),
                     "compression": compression.dictionary_encode().cast(_WORD),
                     "size": pa.array(sizes, pa.int64()), "version": pa.array(versions, pa.string())},
                    schema=SHARD_SCHEMA).filter(wanted)


def _suffix(names: pa.Array, pattern: str) -> pa.Array:
    """The group `s` of `pattern` in each name; null where it does not match."""
    found = pc.extract_regex(names, pattern)
    return pc.if_else(pc.is_valid(found), found.field("s"), pa.scalar(None, pa.string()))


def _relative(name: pa.Array, base: str) -> pa.Array:
    prefix = base.rstrip("/") + "/"
    if pc.all(pc.starts_with(name, prefix)).as_py() is not False:
        return pc.utf8_slice_codeunits(name, len(prefix))
    return pa.array([posixpath.relpath(n, base) for n in name.to_pylist()], pa.string())


def _formats(lower: pa.Array, declared: str) -> tuple[pa.Array, pa.Array]:
    """(format, compression) per lower-cased file name; format null means "not a corpus file".
    A compression extension (COMPRESSIONS) comes last; with `auto` the extension before it
    decides the format (FORMATS), else the declared format applies to every file. Parquet
    compresses inside the file: a compressed `.parquet` is not a corpus file."""
    compressed_suffix = "(?:" + "|".join(re.escape(ext) for ext in COMPRESSIONS) + ")$"
    compression = _suffix(lower, f"(?P<s>{compressed_suffix})")
    compressed = pc.is_valid(compression)
    stem = pc.if_else(compressed, pc.replace_substring_regex(lower, compressed_suffix, ""), lower)
    extension = _suffix(stem, r"[^/](?P<s>\.[^/.]*)$")
    keys = list(FORMATS)
    if declared == "auto":
        fmt = pa.array([FORMATS[k] for k in keys]).take(pc.index_in(extension, pa.array(keys)))
    else:
        fmt = pa.array([declared] * len(lower), pa.string())
    fmt = pc.if_else(pc.and_(pc.equal(fmt, "parquet"), compressed), pa.scalar(None, pa.string()), fmt)
    compression = pa.array(list(COMPRESSIONS.values())).take(pc.index_in(compression, pa.array(list(COMPRESSIONS))))
    return fmt, compression


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
    (zstd streams are read across frames, as `zstd -d` does, and buffered so lines can be
    iterated). A compressed stream cut short raises EOFError, as gzip's does."""
    if shard.compression != "zstd":
        with fs.open(shard.path, "rb", compression=shard.compression) as f:
            yield f
        return
    with fs.open(shard.path, "rb") as raw:
        with io.BufferedReader(_ZstdFrames(raw), buffer_size=1 << 20) as f:
            yield f


class _ZstdFrames(io.RawIOBase):
    """Every frame of a zstd stream, one after the other. zstandard's own `stream_reader` ends
    quietly where a file is cut short mid-frame (the rows after the cut would vanish unnoticed);
    this raises EOFError there instead."""

    def __init__(self, raw: io.BufferedIOBase):
        import zstandard

        self.raw, self.context = raw, zstandard.ZstdDecompressor()
        self.frame, self.in_frame = self.context.decompressobj(), False
        self.pending, self.at = b"", 0  # decompressed bytes not yet handed out, from `at` on

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.at == len(self.pending):
            chunk = self.raw.read(1 << 20)
            if not chunk:
                if self.in_frame:
                    raise EOFError("zstd stream ended in the middle of a frame (the file is cut short)")
                return 0
            self.pending, self.at = self._decompress(chunk), 0
        n = min(len(buffer), len(self.pending) - self.at)
        buffer[:n] = memoryview(self.pending)[self.at:self.at + n]
        self.at += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            out.append(self.frame.decompress(data))
            self.in_frame = not self.frame.eof
            data = self.frame.unused_data if self.frame.eof else b""
            if self.frame.eof:
                self.frame, self.in_frame = self.context.decompressobj(), False
        return b"".join(out)


def count_rows(fs: fsspec.AbstractFileSystem, shard: Shard, cfg: InputConfig | None = None) -> int:
    """Rows in a shard: lines for JSONL/text (a last line without newline counts), rows for Parquet.
    With `cfg`, InputError also for a shard that cannot hold the documents it names (see `check_format`)."""
    if cfg is not None:
        check_format(shard, cfg)
    try:
        if shard.format == "parquet":
            with fs.open(shard.path, "rb") as f:
                parquet = pq.ParquetFile(f)
                if cfg is not None:
                    _check_document_column(set(parquet.schema_arrow.names), shard, cfg)
                return parquet.metadata.num_rows
        lines, last = 0, b"\n"
        with open_shard(fs, shard) as f:
            while chunk := f.read(1 << 22):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
        return lines + (last != b"\n")
    except InputError:
        raise
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
        records = _line_records(fs, shard, cfg.max_line_bytes)
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


def read_fragments(
    fs: fsspec.AbstractFileSystem, shard: Shard, fragment_rows: int, cfg: InputConfig,
    kept: pa.Schema | None = None, skip: frozenset[int] = frozenset(),
) -> Iterator[tuple[int, int, bool, FragmentRows | None]]:
    """Stream a shard once, cut into consecutive row ranges of `fragment_rows` rows as it goes:
    yields (start, end, last, rows) for every range, `last` true for the range the shard ends in
    (an empty shard has one, [0, 0)). No count beforehand: a range is known to be the last when
    the rows after it run out. A range whose start is in `skip` is stepped over unparsed (rows None).
    Raises InputError naming the shard (and the rows read before) when it cannot be read."""
    kept_types = {name: pa.string() for name in cfg.keep_fields}
    kept_types.update({f.name: f.type for f in kept or []})
    start, records = 0, None
    check_format(shard, cfg)
    try:
        records = _parquet_records(fs, shard, cfg, None) if shard.format == "parquet" else \
            _line_records(fs, shard, cfg.max_line_bytes)
        upcoming = next(records, None)
        while True:
            builder = None if start in skip else _Builder(shard, cfg, kept_types)
            end = start
            while upcoming is not None and upcoming[0] < start + fragment_rows:
                if builder is not None:
                    builder.add(*upcoming)
                end = upcoming[0] + 1
                upcoming = next(records, None)
            last = upcoming is None
            yield start, end, last, None if builder is None else builder.finish()
            if last:
                return
            start = end
    except Exception as exc:  # noqa: BLE001 - a truncated or vanished file, a corrupt footer, ...
        where = f" after row {start:,}" if start else ""
        cause = exc if isinstance(exc, InputError) else one_line(exc)
        raise InputError(f"cannot read shard {shard.source}{where}: {cause}") from None
    finally:
        if records is not None:
            records.close()


def _check_document_column(names: set[str], shard: Shard, cfg: InputConfig) -> str:
    """The column of a Parquet shard holding the documents (text or words); InputError if absent."""
    field = cfg.document_field
    if field not in names:
        key = "text_field" if cfg.words_field is None else "words_field"
        raise InputError(f"shard {shard.source} has no column {field!r} (input.{key})")
    return field


def check_format(shard: Shard, cfg: InputConfig) -> None:
    """InputError when the shard's format cannot hold what the config reads from it."""
    if shard.format == "text" and cfg.words_field is not None:
        raise InputError(f"shard {shard.source} is plain text (one document per line), which holds no list of "
                         f"words: input.words_field needs JSONL or Parquet shards")


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
                        texts[(source, row)] = shown_text(text)
        except InputError:
            continue
    return texts


def _line_records(fs, shard: Shard, limit: int) -> Iterator[tuple[int, bytes | str]]:
    """(row, raw line) — lines are parsed only once they fall inside a wanted range — or, for a
    line longer than `limit` bytes, (row, why it is quarantined): such a line is never held."""
    with open_shard(fs, shard) as f:
        for row, line in enumerate(bounded_lines(f, limit)):
            yield row, line if isinstance(line, bytes) else (
                f"a line of {line:,} bytes, longer than input.max_line_bytes ({limit:,}): not read into memory")


def bounded_lines(f, limit: int, chunk_bytes: int = 1 << 20) -> Iterator[bytes | int]:
    """The lines of a binary stream, without their newline, read `chunk_bytes` at a time; a line
    longer than `limit` bytes comes as its length (an int), its bytes skipped as they stream by,
    so memory stays within limit + chunk_bytes whatever the input. A last line without newline
    counts, as in `count_rows`."""
    head: list[bytes] = []  # the pieces of a line that runs across chunks
    size, skipping = 0, False
    while chunk := f.read(chunk_bytes):
        parts = chunk.split(b"\n")
        for i, part in enumerate(parts):
            if i == len(parts) - 1:  # no newline after it (yet): the line goes on in the next chunk
                size += len(part)
                if not skipping and size > limit:
                    skipping, head = True, []
                elif not skipping and part:
                    head.append(part)
                break
            if not head and not skipping and not size:  # a whole line inside this chunk: the common case
                yield part if len(part) <= limit else len(part)
                continue
            size += len(part)
            yield size if skipping or size > limit else b"".join(head) + part
            head, size, skipping = [], 0, False
    if size or head:
        yield size if skipping else b"".join(head)


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


def _parquet_records(fs, shard: Shard, cfg: InputConfig, stop: int | None) -> Iterator[tuple[int, object]]:
    with fs.open(shard.path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        field = _check_document_column(names, shard, cfg)
        wanted = [c for c in dict.fromkeys([cfg.id_field, field, *cfg.keep_fields]) if c in names]
        row = 0
        for batch in pf.iter_batches(columns=wanted, batch_size=4096):
            for record in _batch_records(batch):
                yield row, record
                row += 1
            if stop is not None and row >= stop:
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
        field = self.cfg.document_field
        text = record.get(field)
        problem = (_text_problem if self.cfg.words_field is None else _words_problem)(text, field, field in record)
        if problem:
            self._quarantine(doc_id, row, problem, text)
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

    def _quarantine(self, doc_id: str, row: int, reason: str, text: object) -> None:
        self.out.quarantine.append(
            {"id": doc_id, "source": self.shard.source, "row": row, "reason": reason,
             "text": shown_text(text)[:QUARANTINE_TEXT_CHARS]}
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
            "text": pa.array(self.texts, pa.string() if self.cfg.words_field is None else pa.list_(pa.string())),
        }
        for name, values in self.kept.items():
            columns[name] = kept_array(values, self.kept_types[name])
        return pa.table(columns)

    def _quarantine_unstorable(self) -> None:
        """Quarantine each document holding a value Arrow cannot store: a string with a lone
        surrogate (JSON's `\\ud800` escape), or a kept value of another type than the output's."""
        keep = []
        for i, (doc_id, row, text) in enumerate(zip(self.ids, self.rows, self.texts)):
            problem = _unicode_problem("'id'", doc_id) or _text_unicode_problem(self.cfg, text) or next(
                (p for name, values in self.kept.items() if (p := _kept_problem(name, values[i], self.kept_types[name]))),
                None)
            if problem:
                self._quarantine(doc_id, row, problem, text)
            else:
                keep.append(i)
        self.ids, self.rows, self.texts = ([values[i] for i in keep] for values in (self.ids, self.rows, self.texts))
        self.kept = {name: [values[i] for i in keep] for name, values in self.kept.items()}


def _unicode_problem(label: str, text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{label} holds a lone surrogate (\\u{ord(text[exc.start]):04x} at character {exc.start}), not valid Unicode"
    return None


def _text_unicode_problem(cfg: InputConfig, text: str | list[str]) -> str | None:
    if cfg.words_field is None:
        return _unicode_problem(repr(cfg.text_field), text)
    return next((p for i, word in enumerate(text) if (p := _unicode_problem(f"{cfg.words_field!r}[{i}]", word))), None)


def shown_text(text: object) -> str:
    """A document's text as quarantine records show it: given words joined by spaces, other
    values that are not text as nothing."""
    if isinstance(text, str):
        return text
    if isinstance(text, list):
        return " ".join(word for word in text if isinstance(word, str))
    return ""


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


def _absence(value: object, field_name: str, present: bool) -> str | None:
    if not present:
        return f"no {field_name!r} field"
    return f"{field_name!r} is null" if value is None else None


def _text_problem(text: object, field_name: str, present: bool) -> str | None:
    if text is None or not present:
        return _absence(text, field_name, present)
    if not isinstance(text, str):
        return f"{field_name!r} is a {type(text).__name__}, not a string"
    if not text.strip():
        return f"{field_name!r} is empty or whitespace"
    if not has_visible_text(text):
        return f"{field_name!r} holds only whitespace and control characters (NUL, ...)"
    return None


def _words_problem(words: object, field_name: str, present: bool) -> str | None:
    """Why a value is not a document's list of words (pre-tokenized input), or None."""
    if words is None or not present:
        return _absence(words, field_name, present)
    if not isinstance(words, list):
        return f"{field_name!r} is a {type(words).__name__}, not a list of words (strings)"
    if not words:
        return f"{field_name!r} is an empty list"
    for i, word in enumerate(words):
        if not isinstance(word, str):
            kind = "null" if word is None else f"a {type(word).__name__}"
            return f"{field_name!r}[{i}] is {kind}, not a string (a word)"
        if not word.strip():
            return f"{field_name!r}[{i}] is an empty word ({word!r}); a word holds at least one visible character"
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
