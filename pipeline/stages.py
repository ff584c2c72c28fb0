"""The four pipeline steps as plain Python over one fragment payload each:

    read (shard → fragments' rows) → tokenize → embed → write + commit

In an incremental version the read step embeds only the added and changed documents of a
fragment and names the unchanged ones, whose rows the write step copies from the older
version's files (`incremental.py`).

A payload is a flat dict of a fragment's JSON, its tables as Arrow IPC bytes and a few
counters, so Ray Data can carry it as one row. Nothing here imports Ray: `ray_pipeline.py`
wires these steps into a Ray Data dataset, and tests call them directly.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import faults
from pipeline.config import InputConfig, StorageConfig
from pipeline.fragments import Fragment, cut, shard_failure_id, table_from_bytes, table_to_bytes
from pipeline.errors import InputError, StrataError, one_line
from pipeline.changes import content_hashes, index_table
from pipeline.incremental import carried_rows, changes_name, read_changes, split_by_changes
from pipeline.lease import LeaseLost, confirm_holder
from pipeline.manifest import HASHES_DIR, CommitRecord, FailureRecord, Manifest, file_stem
from pipeline.model import ModelInfo, local_model_path
from pipeline.output import output_table, parquet_bytes, partition_files, quarantine_table, row_table
from pipeline.sources import QUARANTINE_TEXT_CHARS, Shard, read_fragments, shown_text
from pipeline.spec import EmbedSettings
from pipeline.storage import Location, open_fs
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
    storage: StorageConfig = field(default_factory=StorageConfig)
    version: int = 1  # the output version being made
    changes_dir: str | None = None  # where the changed shards' diffs are (incremental versions only)
    keep_schema: pa.Schema | None = None  # the output's type of each kept field (sources.keep_schema)
    fragment_docs: int = 4096  # rows per fragment (batching.fragment_docs)
    salt: str = ""  # what joins each shard's version in fragment ids: settings fingerprint and version
    lease_token: str = ""  # the run's lease (lease.py): workers confirm it before journals and commits
    lease_generation: int = 0  # its fencing token, written into journals and commit records

    def changes_uri(self, source: str) -> str | None:
        if self.changes_dir is None:
            return None
        return Location.from_uri(self.output_uri, self.storage).uri(self.changes_dir, changes_name(source))


def read_shard(shard: Shard, job: "JobSpec", skip: frozenset[int] = frozenset()) -> Iterator[dict]:
    """One payload per fragment of this shard, cut as the shard streams by (`sources.read_fragments`);
    fragments starting at a row in `skip` (committed by an earlier run) are stepped over. If the
    shard cannot be read, or breaks off (a truncated gzip, a vanished file), one payload carries
    the error for the rest of the shard. With the shard's changes, only its added and changed
    documents go on to be embedded."""
    cfg = job.input
    started = time.time()
    fragment = cut(shard, 0, 0, False, job.salt)
    manifest = Manifest(Location.from_uri(job.output_uri, job.storage)) if job.output_uri else None
    marker = None
    try:
        if manifest:  # counts the read tasks this shard kills (see runner._after_worker_deaths)
            marker = manifest.note_attempt(shard_failure_id(shard.source), shard.source, None, None, "read")
        fs, _ = open_fs(cfg.uri, job.storage)
        changes_uri = job.changes_uri(shard.source)
        changes = read_changes(changes_uri, job.storage) if changes_uri else None
        for start, end, last, rows in read_fragments(fs, shard, job.fragment_docs, cfg, job.keep_schema, skip):
            fragment = cut(shard, start, end, last, job.salt)
            faults.maybe_kill("read", start)
            if rows is None:
                continue
            hashes = content_hashes(rows.docs, cfg.keep_fields)
            docs, carry = rows.docs, b""
            if changes is not None:
                docs, carried = split_by_changes(docs, hashes, changes)
                carry = table_to_bytes(carried) if carried.num_rows else b""
            index = index_table(rows.docs["id"], hashes, rows.docs["row"])
            yield _payload(fragment, started, docs=table_to_bytes(docs), blank=rows.blank, carry=carry,
                           index=table_to_bytes(index), quarantine=table_to_bytes(quarantine_table(rows.quarantine)))
            started = time.time()
    except Exception as exc:  # noqa: BLE001 - whatever broke the shard is the failure reason of its rest
        failed = Fragment(shard_failure_id(shard.source), shard, fragment.end, fragment.end)
        yield _payload(failed, started, shard_failed=True, error=str(exc) if isinstance(exc, InputError) else
                       f"cannot read shard {shard.source}: {_describe(exc)}")
    if marker:  # read to its end: its worker survived it
        try:
            manifest.forget_attempt(marker)
        except Exception:  # noqa: BLE001 - a marker left behind counts one try too many, nothing worse
            pass


def _payload(fragment: Fragment, started: float, **fields) -> dict:
    """Every payload has the same keys from the first step on, so Ray Data sees one schema."""
    empty = table_to_bytes(quarantine_table([]))
    return {"fragment": fragment.to_json(), "started": started, "docs": b"", "quarantine": empty, "windows": b"",
            "carry": b"", "index": b"", "blank": 0, "embedded": 0, "padded_tokens": 0, "error": "", "fatal": False,
            "shard_failed": False, "lease_lost": False,
            **fields}


def cannot_start(payload: dict, step: str, cause: str) -> dict:
    """The payload of a fragment that met a step whose worker could not start (a model that does
    not load, a tokenizer file that does not parse): not the fragment's fault, and no other
    fragment will fare better, so the run stops with this one line instead of failing them all."""
    return {**payload, "docs": b"", "windows": b"", "fatal": True, "error": f"{step} cannot start: {cause}"}


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, StrataError) else one_line(exc)


def _guarded(step):
    """A step that passes failed payloads through and turns its own exception into the
    fragment's failure reason, so one bad fragment never stops the run."""

    @functools.wraps(step)
    def run(self, payload: dict) -> dict:
        if payload["error"]:
            return payload
        try:
            return step(self, payload)
        except LeaseLost as exc:  # the run lost its output: it stops, nothing is recorded
            return {**payload, "docs": b"", "windows": b"", "fatal": True, "lease_lost": True, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - recorded as the fragment's failure
            return {**payload, "docs": b"", "windows": b"", "error": f"{type(self).__name__.lower()}: {_describe(exc)}"}

    return run


EMPTY_REASON = ("the tokenizer keeps nothing of the text (only characters it strips: zero-width, bidi or control "
                "characters, soft hyphens, ...)")


class Tokenize:
    """Replaces the text column (a text, or a list of words) by n_tokens, truncated and, for
    words, n_words, and adds the fragment's windows."""

    def __init__(self, model: ModelInfo | str, max_length: int, stride: int | None, details: bool, words: bool = False,
                 output_uri: str | None = None, storage: StorageConfig | None = None):
        self.tokenizer = TextTokenizer(model, max_length, stride, details, words)
        self.manifest = Manifest(Location.from_uri(output_uri, storage)) if output_uri else None

    @_guarded
    def __call__(self, payload: dict) -> dict:
        if self.manifest:  # counts the tokenizer deaths a fragment causes (see runner._after_worker_deaths)
            fragment = Fragment.from_json(payload["fragment"])
            self.manifest.note_attempt(fragment.id, fragment.shard.source, fragment.start, fragment.rows, "tokenize")
            faults.maybe_kill("tokenize", fragment.start)
        docs = read = table_from_bytes(payload["docs"])
        texts = docs["text"].to_pylist()
        try:
            windows = self.tokenizer.encode(texts)
            bad: dict[int, str] = {}
        except Exception:  # noqa: BLE001 - find the documents the tokenizer rejects, keep the rest
            bad = self._rejected(texts)
            docs = docs.filter(pa.array([i not in bad for i in range(len(texts))]))
            windows = self.tokenizer.encode(docs["text"].to_pylist())
        empty = self.tokenizer.empty(windows)
        if empty.any():  # every such document would get the same vector, matching every search alike
            kept = np.flatnonzero(~np.isin(np.arange(read.num_rows), list(bad)))
            bad.update({int(kept[i]): EMPTY_REASON for i in np.flatnonzero(empty)})
            docs, windows = docs.filter(pa.array(~empty)), windows.select(~empty)
        quarantine = _append_quarantine(payload["quarantine"], read, bad, texts)
        docs = docs.drop_columns(["text"])
        docs = docs.append_column("n_tokens", pa.array(windows.n_tokens, pa.int32()))
        docs = docs.append_column("truncated", pa.array(windows.truncated, pa.bool_()))
        if windows.n_words is not None:
            docs = docs.append_column("n_words", pa.array(windows.n_words, pa.int32()))
        return {**payload, "docs": table_to_bytes(docs), "windows": table_to_bytes(windows.to_table()),
                "quarantine": quarantine}

    def _rejected(self, texts: list[str]) -> dict[int, str]:
        bad = {}
        for i, text in enumerate(texts):
            try:
                self.tokenizer.encode([text])
            except Exception as exc:  # noqa: BLE001
                bad[i] = f"the tokenizer failed: {_describe(exc)}"
        return bad


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_MALLOC_TRIM = _malloc_trim()


def release_host_memory() -> None:
    """Hand the heap memory a fragment freed back to the OS. Micro-batches of ever-changing
    shapes fragment glibc's heap: without this a CPU replica's memory crept up by ~500 MB over 40
    fragments (`strata bench --memory-scale 10`); with it, it stays flat."""
    pa.default_memory_pool().release_unused()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class Embed:
    """Adds the output vectors; the payload's docs become the output rows."""

    def __init__(self, settings: EmbedSettings, keep_fields: list[str], output_uri: str | None = None,
                 storage: StorageConfig | None = None, lease_token: str = ""):
        from pipeline.embedder import Embedder  # torch: only model replicas import it

        local = dataclasses.replace(settings.model, path=local_model_path(settings.model, storage))
        self.embedder = Embedder(dataclasses.replace(settings, model=local))
        self.keep_fields = keep_fields
        self.manifest = Manifest(Location.from_uri(output_uri, storage)) if output_uri else None
        self.lease_token = lease_token

    @_guarded
    def __call__(self, payload: dict) -> dict:
        fragment = Fragment.from_json(payload["fragment"])
        if self.manifest:  # counts the worker deaths a fragment causes (see runner._execute)
            if self.lease_token:
                confirm_holder(self.manifest.location, self.lease_token)
            self.manifest.note_attempt(fragment.id, fragment.shard.source, fragment.start, fragment.rows)
        docs = table_from_bytes(payload["docs"])
        windows = TokenWindows.from_table(table_from_bytes(payload["windows"]), docs["n_tokens"].to_numpy(),
                                          docs["truncated"].to_numpy(zero_copy_only=False),
                                          docs["n_words"].to_numpy() if "n_words" in docs.column_names else None)
        result = self.embedder.embed(windows)
        faults.maybe_kill("embed", fragment.start)
        row_doc = windows.doc if self.embedder.settings.window_rows else np.arange(docs.num_rows)
        for doc in not_finite(result, row_doc):  # e.g. weights that overflow float16: never stored as inf/NaN
            result.failed_docs.setdefault(int(doc), (
                f"its vectors are not finite (inf or NaN: beyond {self.embedder.settings.precision}'s range, "
                f"{np.finfo(self.embedder.settings.precision).max:.0f}); lower the output's weights or store float32"))
        rows = output_table(row_table(docs, windows, self.embedder.settings.window_rows, self.keep_fields), result)
        quarantine = payload["quarantine"]
        if result.failed_docs:  # drop every row (document or window) of a document that failed
            rows = rows.filter(pa.array(~np.isin(row_doc, list(result.failed_docs))))
            quarantine = _append_quarantine(quarantine, docs, result.failed_docs)
        release_host_memory()  # the micro-batches' activations are freed by now
        return {**payload, "docs": table_to_bytes(rows), "windows": b"", "quarantine": quarantine,
                "embedded": docs.num_rows - len(result.failed_docs), "padded_tokens": result.padded_tokens}


def not_finite(result, row_doc: np.ndarray) -> np.ndarray:
    """Documents with an inf or NaN anywhere in their vectors (row_doc: (R,) document of each row)."""
    bad = np.zeros(len(row_doc), bool)
    for name, vectors in result.vectors.items():
        finite = np.isfinite(vectors.reshape(len(vectors), -1)).all(axis=1) if vectors.size else \
            np.ones(len(vectors), bool)
        units = result.token_units.get(name)
        if units is None:
            bad |= ~finite
        else:  # token-level: a row is bad when one of its tokens is
            bad[np.repeat(np.arange(len(row_doc)), units.counts)[~finite]] = True
    return np.unique(row_doc[bad])


def _append_quarantine(quarantine: bytes, docs: pa.Table, reasons: dict[int, str], texts: list[str] | None = None) -> bytes:
    """The fragment's quarantine table plus the given documents (row index in docs -> reason)."""
    if not reasons:
        return quarantine
    added = [{"id": docs["id"][i].as_py(), "source": docs["source"][i].as_py(), "row": docs["row"][i].as_py(),
              "reason": reason, "text": shown_text(texts[i] if texts else "")[:QUARANTINE_TEXT_CHARS]}
             for i, reason in sorted(reasons.items())]
    return table_to_bytes(pa.concat_tables([table_from_bytes(quarantine), quarantine_table(added)]))


def write_fragment(payload: dict, job: JobSpec) -> CommitRecord | FailureRecord:
    """Write the data files, then the quarantine file and the hash index, then the commit record
    (last); or, for a fragment that failed on the way, its failure record. Whatever goes wrong
    while writing (a full disk, a read-only or vanished output, a denied bucket) is that
    fragment's failure, with its cause."""
    fragment = Fragment.from_json(payload["fragment"])
    if payload["fatal"]:  # the run stops; the fragment itself did nothing wrong and is not recorded
        return FailureRecord(fragment.id, fragment.shard.source, payload["error"], fragment.rows)
    location = Location.from_uri(job.output_uri, job.storage)
    if not payload["error"]:
        try:
            return _write(fragment, payload, job, location)
        except LeaseLost:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded as the fragment's failure; the run goes on
            payload = {**payload, "error": f"writing it: {_describe(exc)}"}
    failure = FailureRecord(fragment.id, fragment.shard.source, payload["error"],
                            None if payload["shard_failed"] else fragment.rows)
    try:
        if job.lease_token:  # a run that lost the output records nothing more
            confirm_holder(location, job.lease_token)
        Manifest(location).fail(failure)
    except LeaseLost:
        raise
    except Exception:  # noqa: BLE001 - the output itself is failing: the driver reports it
        pass
    return failure


def _write(fragment: Fragment, payload: dict, job: JobSpec, location: Location) -> CommitRecord:
    rows = table_from_bytes(payload["docs"])
    carried = rows.schema.empty_table()
    if payload["carry"]:
        try:
            carried = carried_rows(location, table_from_bytes(payload["carry"]), rows.schema)
        except Exception as exc:  # noqa: BLE001 - the fragment fails; a rerun tries again
            raise StrataError(f"copying unchanged documents: {_describe(exc)}") from None
    if carried.num_rows:
        order = [("row", "ascending")] + ([("window", "ascending")] if "window" in rows.column_names else [])
        rows = pa.concat_tables([rows, carried]).sort_by(order)
    stem = file_stem(fragment.id, job.lease_generation)  # a newer run never writes these names again
    parts = partition_files(rows, job.partition_by, stem)
    quarantine = table_from_bytes(payload["quarantine"])
    quarantine_file = f"quarantine/{stem}.parquet" if quarantine.num_rows else None
    index_file = f"{HASHES_DIR}/{stem}.parquet"
    manifest = Manifest(location, job.lease_generation)
    if job.lease_token:  # a run that lost the output writes nothing more into the manifest
        confirm_holder(location, job.lease_token)
    manifest.note_attempt(fragment.id, fragment.shard.source, fragment.start, fragment.rows, "write")
    faults.maybe_kill("write", fragment.start)
    manifest.begin_writing(fragment.id, [path for path, _ in parts] + [index_file] +
                           ([quarantine_file] if quarantine_file else []))
    for path, part in parts:
        location.write_bytes(parquet_bytes(part, job.file_metadata), path)
    if quarantine_file:
        location.write_bytes(parquet_bytes(quarantine), quarantine_file)
    index = table_from_bytes(payload["index"])
    index = index.filter(pc.is_in(index["row"], rows["row"]))  # documents that made it into the data
    location.write_bytes(parquet_bytes(index), index_file)
    carried_docs = pc.count_distinct(carried["row"]).as_py() if carried.num_rows else 0
    record = CommitRecord(
        fragment=fragment.id,
        source=fragment.shard.source,
        start=fragment.start,
        end=fragment.end,
        files=[path for path, _ in parts],
        rows=fragment.rows,
        docs=int(payload["embedded"]) + carried_docs,
        quarantined=quarantine.num_rows,
        blank=int(payload["blank"]),
        tokens=int(pc.sum(rows["n_tokens"]).as_py() or 0),
        padded_tokens=int(payload["padded_tokens"]),
        seconds=round(time.time() - float(payload["started"]), 3),
        quarantine_file=quarantine_file,
        version=job.version,
        carried=carried_docs,
        carried_tokens=int(pc.sum(carried["n_tokens"]).as_py() or 0) if carried.num_rows else 0,
        shard_version=fragment.shard.version,
        last=fragment.last,
        truncated=int(pc.sum(rows["truncated"]).as_py() or 0),
        lease_generation=job.lease_generation,
        hash_file=index_file if stem != fragment.id else "",
    )
    if job.lease_token:
        confirm_holder(location, job.lease_token)
    manifest.commit(record)
    return record
