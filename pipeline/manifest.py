"""The manifest under OUTPUT/_manifest: the run's identity and one commit record per fragment.

`run.json` holds the resolved config, its fingerprint, the model identity and the latest
summary. `fragments/<id>.json` is written only after every data file of that fragment (and its
hash index, `hashes/<id>.parquet`) is in place: a fragment with a record is done, one without
is recomputed. That is all resuming needs. Before writing a fragment's first file, the write
step names every file it is about to write in `writing/<id>.json` (the write journal, removed
after the commit): a run that dies midway leaves the journal, and the next run removes exactly
the files it names — never a file strata cannot prove it wrote. `failures/<id>.json` says why
the last run could not embed a fragment or a shard. Which committed fragments make up a
published version is the business of `versions.py`.

`index/<time>-<random>.parquet` are compact copies of commit records (one row each, with the
size of the record's file), which the driver writes as records come in, so that reading the
committed records of an output costs a listing and a few index files instead of a GET per
fragment. The records stay the truth: an index row counts only while its record is listed with
the same size; a record the index lacks (or disagrees with) is read from its own file.

Everything here reads files that other processes (or people) may have damaged: a record cut
short or of the wrong shape is an `OutputError` naming the file, never a traceback.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import time
import uuid
from dataclasses import MISSING, asdict, dataclass, fields

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import identity_changes
from pipeline.errors import OutputError, one_line
from pipeline.storage import Location, temp_target

RUN_FILE = "_manifest/run.json"
FRAGMENTS_DIR = "_manifest/fragments"
HASHES_DIR = "_manifest/hashes"  # per fragment: id, content hash and row of each document in its data
FAILURES_DIR = "_manifest/failures"
ATTEMPTS_DIR = "_manifest/attempts"  # one object per start of a step on a fragment (or of a shard's read), this run
WRITING_DIR = "_manifest/writing"  # per fragment being written: the files it is about to write
LEASE_FILE = "_manifest/lease.json"  # see lease.py
WRITE_PROBE = "_manifest/.write-probe"
INDEX_DIR = "_manifest/index"  # compact copies of commit records, see above
INDEX_FILES_MAX = 8  # index files before `fold` merges them into one
_INDEX_FILE = re.compile(r"^\d{20}-[0-9a-f]{8}\.parquet$")
STEPS = ("read", "tokenize", "embed", "write")  # the steps whose starts attempt markers count
_ATTEMPT = re.compile(rf"^(?P<fragment>.+)\.(?:(?P<step>{'|'.join(STEPS)})-)?[0-9a-f]{{12}}$")  # no step: embed


@dataclass
class CommitRecord:
    fragment: str
    source: str
    start: int
    end: int
    files: list[str]
    rows: int  # input rows in the range
    docs: int  # documents in its data: embedded, plus carried from an older version
    quarantined: int
    blank: int
    tokens: int  # n_tokens of every row in its data
    padded_tokens: int
    seconds: float
    quarantine_file: str | None = None
    version: int = 1  # the output version it was made for
    carried: int = 0  # of `docs`, unchanged documents whose rows were copied from an older version
    carried_tokens: int = 0
    shard_version: str = ""  # the shard's version it was read from (see sources.file_version)
    last: bool = False  # the shard's last fragment: the shard ends at `end`
    truncated: int = 0  # of `docs`, documents cut at max_length
    lease_generation: int = 0  # the fencing token of the run that committed it (lease.py); 0: before leases had one
    hash_file: str = ""  # its hash index; "" for `_manifest/hashes/<fragment>.parquet` (see `hash_file_of`)

    @property
    def embedded(self) -> int:
        return self.docs - self.carried

    @property
    def embedded_tokens(self) -> int:
        return self.tokens - self.carried_tokens


@dataclass
class FailureRecord:
    """A fragment (or a whole shard) the last run could not embed, and why; rerunning retries it."""

    fragment: str  # fragment id, or shard-<digest> for a shard that could not even be counted
    source: str
    reason: str
    rows: int | None  # input rows left out; None when the shard could not be counted


class Manifest:
    def __init__(self, location: Location, generation: int = 0):
        self.location = location
        self.generation = generation  # this run's lease generation: written into journals; newer ones are not touched

    def read_run(self) -> dict | None:
        """run.json, checked for the keys strata reads; None when the output has none yet."""
        data = self.location.read_optional(RUN_FILE)
        if data is None:
            return None
        run = parse_json(self.location, RUN_FILE, data, dict)
        for key, kind in (("fingerprint", str), ("identity", dict), ("model", dict), ("plan", dict)):
            if not isinstance(run.get(key), kind):
                raise damaged(self.location, RUN_FILE, f"its {key!r} is missing or not a {kind.__name__}")
        for key in ("fragments", "rows"):  # null until every shard of the version was read
            if key not in run["plan"] or not isinstance(run["plan"][key], (int, type(None))) or \
                    isinstance(run["plan"][key], bool):
                raise damaged(self.location, RUN_FILE, f"its plan.{key} is missing or not a number")
        return run

    def write_run(self, run: dict) -> None:
        self.location.write_bytes(json.dumps(run, indent=2).encode(), RUN_FILE)

    def check_settings(self, run: dict, previous: dict | None) -> None:
        """Refuse an output whose run record (`previous`, from `read_run`) was made with other settings."""
        if previous and previous.get("fingerprint") != run["fingerprint"]:
            changes = identity_changes(previous.get("identity", {}), run["identity"])[:3]
            raise OutputError(
                f"output {self.location.uri()} holds a run made with different settings "
                f"({'; '.join(changes) or 'fingerprint ' + str(previous.get('fingerprint'))}); "
                "`strata run --incremental` embeds everything again into a new version and keeps the old one; "
                "or use a new output.uri"
            )

    def begin(self, run: dict, previous: dict | None) -> None:
        """Claim the output for this run, once `check_settings` passed; the last summary stays until
        this run writes its own."""
        if previous and "summary" in previous:
            run = {**run, "summary": previous["summary"]}
        self.write_run(run)

    def committed(self) -> set[str]:
        return {n.removesuffix(".json") for n in self.location.list_names(FRAGMENTS_DIR) if n.endswith(".json")}

    def _listed_records(self) -> dict[str, int]:
        """fragment id -> size in bytes of its commit record, from one listing."""
        return {n.removesuffix(".json"): size for n, size in self.location.list_sizes(FRAGMENTS_DIR).items()
                if n.endswith(".json")}

    def record(self, fragment: str) -> CommitRecord:
        return read_record(self.location, f"{FRAGMENTS_DIR}/{fragment}.json", CommitRecord)

    def begin_writing(self, fragment: str, files: list[str]) -> None:
        """The write journal: written before the first of `files`, so a run that dies midway
        leaves a list of exactly what the next run may remove."""
        self.location.write_bytes(json.dumps({"files": files, "lease_generation": self.generation}).encode(),
                                  WRITING_DIR, f"{fragment}.json")

    def _newer_journal(self, fragment: str) -> bool:
        """Whether a run of a newer lease generation than this one is writing `fragment` (its files
        are that run's, whatever this run believes)."""
        try:
            journal = read_json(self.location, f"{WRITING_DIR}/{fragment}.json", dict)
        except OutputError:
            return False
        return generation_of(journal) > self.generation

    def commit(self, record: CommitRecord) -> None:
        self.location.write_bytes(record_bytes(record), FRAGMENTS_DIR, f"{record.fragment}.json")
        try:  # the journal has done its job (a fragment written before journals existed has none)
            self.location.remove(WRITING_DIR, f"{record.fragment}.json")
        except FileNotFoundError:
            pass

    def fail(self, record: FailureRecord) -> None:
        self.location.write_bytes(json.dumps(asdict(record)).encode(), FAILURES_DIR, f"{record.fragment}.json")

    def failures(self) -> list[FailureRecord]:
        names = sorted(n for n in self.location.list_names(FAILURES_DIR) if n.endswith(".json"))
        return [read_record(self.location, f"{FAILURES_DIR}/{n}", FailureRecord) for n in names]

    def clear_failures(self) -> None:
        """A new run retries everything that failed before; its own failures are recorded anew."""
        for name in self.location.list_names(FAILURES_DIR):
            if name.endswith(".json") or temp_target(name):
                self.location.remove(FAILURES_DIR, name)
        self.clear_attempts()

    def note_attempt(self, fragment: str, source: str, start: int | None, rows: int | None,
                     step: str = "embed") -> str:
        """Written as a step starts on a fragment (or, for `read`, on a whole shard: `fragment` is
        then the shard's failure id), saying which rows of which shard; a worker that dies leaves
        it behind, so its count says how often a fragment killed its worker in that step.
        Returns the marker's name (see `forget_attempt`)."""
        name = f"{fragment}.{step}-{uuid.uuid4().hex[:12]}"
        self.location.write_bytes(json.dumps({"source": source, "start": start, "rows": rows}).encode(),
                                  ATTEMPTS_DIR, name)
        return name

    def forget_attempt(self, name: str) -> None:
        """Remove a marker whose step finished (a read task reads several shards: only the one it
        dies on may keep its marker)."""
        try:
            self.location.remove(ATTEMPTS_DIR, name)
        except FileNotFoundError:
            pass

    def attempt(self, fragment: str) -> dict:
        """source, start and rows of a fragment whose step started, from one of its markers."""
        for name in self.location.list_names(ATTEMPTS_DIR):
            if (match := _ATTEMPT.match(name)) and match["fragment"] == fragment:
                try:
                    return read_json(self.location, f"{ATTEMPTS_DIR}/{name}", dict)
                except OutputError:
                    continue
        return {}

    def attempts(self) -> dict[str, tuple[str, int]]:
        """fragment (or shard failure id) -> the step that started on it most often, and how often."""
        counts: dict[tuple[str, str], int] = {}
        for name in self.location.list_names(ATTEMPTS_DIR):
            if match := _ATTEMPT.match(name):
                key = (match["fragment"], match["step"] or "embed")
                counts[key] = counts.get(key, 0) + 1
        most: dict[str, tuple[str, int]] = {}
        for (fragment, step), n in sorted(counts.items()):
            if n > most.get(fragment, ("", 0))[1]:
                most[fragment] = (step, n)
        return most

    def clear_attempts(self) -> None:
        """Remove the attempt markers (several per fragment): in batches, one request per 1,000 on S3."""
        self.location.remove_many([f"{ATTEMPTS_DIR}/{name}" for name in self.location.list_names(ATTEMPTS_DIR)
                                   if _ATTEMPT.match(name) or temp_target(name)])

    def remove_unfinished(self) -> list[str]:
        """Delete what a run that died midway left behind, so that a reader of data/ never sees a
        document twice: the files a write journal names for a fragment without a commit record,
        and (on a local disk) temporary files of those names and of the manifest's own files.
        Nothing else: a file strata cannot prove it wrote is never touched. Returns what was removed."""
        journals = self.location.list_names(WRITING_DIR)
        committed = self.committed() if journals else set()
        removed: list[str] = []
        folders: set[str] = set()
        for name in journals:
            fragment = name.removesuffix(".json")
            if not name.endswith(".json") or temp_target(name):
                continue
            journal = f"{WRITING_DIR}/{name}"
            content = read_json(self.location, journal, dict)
            if generation_of(content) > self.generation:  # a newer run's: never ours to remove
                continue
            files = content.get("files", [])
            if fragment not in committed:
                for path in files:
                    if isinstance(path, str) and self.location.exists(path):
                        self.location.remove(path)
                        removed.append(path)
                folders |= {posixpath.dirname(path) for path in files if isinstance(path, str)}
            self.location.remove(journal)
        if self.location.is_local:  # object storage has no temporary files: a PUT is whole or absent
            for path in self.location.find("_manifest") + [f"{folder}/{name}" for folder in sorted(folders)
                                                          for name in self.location.list_names(folder)]:
                if temp_target(posixpath.basename(path)) and self.location.exists(path):
                    self.location.remove(path)
                    removed.append(path)
        return removed

    def remove_fragments(self, records: list[CommitRecord]) -> int:
        """Delete committed fragments: the record first (so a crash leaves files without a record,
        which the next run removes), then data, quarantine and hash files. Returns files removed."""
        removed = 0
        journals = {n.removesuffix(".json") for n in self.location.list_names(WRITING_DIR)}
        for record in records:
            if record.fragment in journals and self._newer_journal(record.fragment):
                continue  # a run of a newer lease generation writes these files now
            if self.location.exists(FRAGMENTS_DIR, f"{record.fragment}.json"):
                self.location.remove(FRAGMENTS_DIR, f"{record.fragment}.json")
            paths = [*record.files, *([record.quarantine_file] if record.quarantine_file else []),
                     hash_file_of(record)]
            for path in paths:
                if self.location.exists(path):
                    self.location.remove(path)
                    removed += 1
        return removed

    def records(self, fragment_ids: set[str] | None = None,
                unindexed: list[CommitRecord] | None = None) -> list[CommitRecord]:
        """Commit records, of every committed fragment or of the given committed ones, sorted by
        fragment id: from the index where it agrees with the listed records, else each from its
        file (those also go to `unindexed`, when given, for the caller to `fold`)."""
        listed = self._listed_records()
        wanted = sorted(listed if fragment_ids is None else set(fragment_ids) & set(listed))
        indexed = self.indexed() if wanted else {}
        found = []
        for fid in wanted:
            entry = indexed.get(fid)
            if entry and entry[1] == listed[fid]:
                found.append(entry[0])
                continue
            found.append(self.record(fid))
            if unindexed is not None:
                unindexed.append(found[-1])
        return found

    def indexed(self) -> dict[str, tuple[CommitRecord, int]]:
        """fragment id -> (record, the size of its file when indexed) of every index file; a later file wins."""
        entries: dict[str, tuple[CommitRecord, int]] = {}
        for name in self._index_files():
            path = f"{INDEX_DIR}/{name}"
            try:
                table = pq.read_table(io.BytesIO(self.location.read_bytes(path)))
                rows = table.to_pylist()
                sizes = [row.pop("record_bytes") for row in rows]
                records = [record_from(row, CommitRecord, ValueError) for row in rows]
            except FileNotFoundError:
                continue  # merged away by another process's fold
            except (KeyError, ValueError, TypeError, pa.ArrowException):
                continue  # a damaged index file only costs reading the records it held
            entries.update((r.fragment, (r, size)) for r, size in zip(records, sizes))
        return entries

    def _index_files(self) -> list[str]:
        return sorted(n for n in self.location.list_names(INDEX_DIR) if _INDEX_FILE.match(n))

    def fold(self, records: list[CommitRecord]) -> None:
        """Add commit records to the index (one new file). When that makes more than
        `INDEX_FILES_MAX` files, merge every entry still committed into one file and remove the
        files it replaces. Only the holder of the output's lease folds."""
        if not records:
            return
        self._write_index(records)
        names = self._index_files()
        if len(names) <= INDEX_FILES_MAX:
            return
        listed = self._listed_records()
        live = [record for fid, (record, size) in self.indexed().items() if listed.get(fid) == size]
        self._write_index(live)
        for name in names:
            self.location.remove(INDEX_DIR, name)

    def _write_index(self, records: list[CommitRecord]) -> None:
        rows = [{**asdict(r), "record_bytes": len(record_bytes(r))} for r in records]
        table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        self.location.write_bytes(sink.getvalue(), INDEX_DIR, f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet")


def file_stem(fragment: str, generation: int) -> str:
    """The name its files take when a run of lease `generation` writes `fragment`: the generation
    is part of it, so a run that lost the output (or a request of a dead run still in flight)
    can only ever remove files of its own generation, never the ones a newer run wrote in their
    place (outside round: a delayed DELETE removed a file of the published version). Without a
    lease (direct calls in tests) the fragment id alone, as before generations existed."""
    return f"{fragment}-g{generation}" if generation else fragment


def hash_file_of(record: CommitRecord) -> str:
    """Where a committed fragment's hash index is (records made before `hash_file` existed: by id)."""
    return record.hash_file or f"{HASHES_DIR}/{record.fragment}.parquet"


def generation_of(data: object) -> int:
    """The lease generation a journal, run.json (`lease_generation`) or lease (`generation`) names;
    0 for none, a negative one or anything that is not a JSON object."""
    if not isinstance(data, dict):
        return 0
    value = data.get("generation", data.get("lease_generation", 0))
    return max(value, 0) if isinstance(value, int) and not isinstance(value, bool) else 0


def record_bytes(record: CommitRecord) -> bytes:
    """A commit record as its file holds it."""
    return json.dumps(asdict(record)).encode()


INDEX_SCHEMA = pa.schema(
    [(f.name, pa.list_(pa.string()) if f.name == "files" else pa.string() if f.type in ("str", "str | None")
      else pa.int64() if f.type == "int" else pa.float64() if f.type == "float" else pa.bool_())
     for f in fields(CommitRecord)] + [("record_bytes", pa.int64())])


def read_json(location: Location, path: str, kind: type) -> dict | list:
    """A JSON file of the manifest, of the given top-level type; OutputError naming it otherwise."""
    try:
        data = location.read_bytes(path)
    except FileNotFoundError:
        raise damaged(location, path, "it vanished while being read (another process removed it)") from None
    return parse_json(location, path, data, kind)


def parse_json(location: Location, path: str, text: bytes, kind: type) -> dict | list:
    """`read_json` of bytes already read from `path`."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise damaged(location, path, f"it is not valid JSON ({one_line(exc)}; cut short?)") from None
    if not isinstance(data, kind):
        raise damaged(location, path, f"it holds a JSON {type(data).__name__}, not a{'n' if kind is dict else ''} "
                                      f"{'object' if kind is dict else kind.__name__}")
    return data


def read_record(location: Location, path: str, kind: type):
    """A commit or failure record, its fields checked against the dataclass's annotations."""
    return record_from(read_json(location, path, dict), kind, lambda why: damaged(location, path, why))


_TYPES = {"str": str, "int": int, "float": (int, float), "list[str]": list, "str | None": (str, type(None)),
          "int | None": (int, type(None)), "bool": bool}


def record_from(data: dict, kind: type, error):
    """`kind(**data)` for a dataclass whose fields are simple types; `error(why)` is raised for a
    missing, unknown or mistyped field (a bool is not a number here)."""
    if not isinstance(data, dict):
        raise error(f"it holds a JSON {type(data).__name__}, not an object")
    known = {f.name: f for f in fields(kind)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise error(f"it has an unknown field {unknown[0]!r}")
    for name, spec in known.items():
        if name not in data:
            if spec.default is MISSING and spec.default_factory is MISSING:
                raise error(f"its field {name!r} is missing")
            continue
        value, wanted = data[name], _TYPES.get(str(spec.type), object)
        if (isinstance(value, bool) and wanted is not bool) or not isinstance(value, wanted) or \
                (spec.type == "list[str]" and not all(isinstance(item, str) for item in value)):
            raise error(f"its field {name!r} is {json.dumps(value)[:40]}, not a {spec.type}")
    return kind(**data)


def damaged(location: Location, path: str, why: str) -> OutputError:
    return OutputError(f"{location.uri(path)} is damaged: {why}; restore it from a copy, or write a new output.uri")


def check_output_folder(location: Location) -> None:
    """Refuse an output location that holds files but is not a strata output: strata writes
    only into an empty (or missing) folder or into its own output, never among files it did not write."""
    if location.exists(RUN_FILE) or location.exists(LEASE_FILE):
        return
    found = location.some_files(limit=4, ignore={WRITE_PROBE})
    if found:
        names = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise OutputError(f"output.uri {location.uri()} is not empty and is not a strata output (it holds {names} "
                          "and no _manifest/run.json); strata writes only into an empty folder or its own output: "
                          "choose another output.uri")


def check_bucket(location: Location) -> None:
    """On object storage, the output's bucket must exist: strata never creates one (a typo in
    output.uri would otherwise make a new bucket wherever the credentials allow)."""
    if not location.is_s3:
        return
    bucket = location.root.strip("/").split("/", 1)[0]
    try:
        location.fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:  # 404: no such bucket
        raise OutputError(f"output.uri {location.uri()}: bucket {bucket} does not exist; strata never creates "
                          "buckets: create it, or fix output.uri") from None
    except Exception:  # noqa: BLE001 - denied or unreachable: the checks that follow say so in their own words
        return


def check_writable(location: Location) -> None:
    """Fail early, with the path in the message, when the output cannot be created. Folders are
    made on local disks only: on object storage a "folder" is a key prefix, and fsspec's makedirs
    creates a missing bucket (s3fs, gcsfs) — a typo in output.uri must not create one."""
    try:
        if location.is_local:
            location.fs.makedirs(location.path(FRAGMENTS_DIR), exist_ok=True)
        probe = location.path(WRITE_PROBE)
        location.fs.pipe_file(probe, b"ok")
        location.fs.rm(probe)
    except Exception as exc:  # noqa: BLE001 - a local permission error, an unreachable or denied bucket, ...
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc)
        raise OutputError(f"output.uri {location.uri()} is not writable: {reason}") from None
