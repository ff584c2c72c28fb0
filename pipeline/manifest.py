"""The manifest under OUTPUT/_manifest: the run's identity and one commit record per fragment.

`run.json` holds the resolved config, its fingerprint, the model identity and the latest
summary. `fragments/<id>.json` is written only after every data file of that fragment (and its
hash index, `hashes/<id>.parquet`) is in place: a fragment with a record is done, one without
is recomputed. That is all resuming needs. `failures/<id>.json` says why the last run could
not embed a fragment or a shard. Which committed fragments make up a published version is the
business of `versions.py`.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from dataclasses import asdict, dataclass

from pipeline.config import identity_changes
from pipeline.errors import OutputError, one_line
from pipeline.storage import TEMP_PREFIX, Location

RUN_FILE = "_manifest/run.json"
FRAGMENTS_DIR = "_manifest/fragments"
HASHES_DIR = "_manifest/hashes"  # per fragment: id, content hash and row of each document in its data
FAILURES_DIR = "_manifest/failures"
ATTEMPTS_DIR = "_manifest/attempts"  # one empty object per start of a fragment's embedding, this run


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
    def __init__(self, location: Location):
        self.location = location

    def read_run(self) -> dict | None:
        if not self.location.exists(RUN_FILE):
            return None
        return json.loads(self.location.read_bytes(RUN_FILE))

    def write_run(self, run: dict) -> None:
        self.location.write_bytes(json.dumps(run, indent=2).encode(), RUN_FILE)

    def check_settings(self, run: dict) -> dict | None:
        """Refuse an output made with other settings; returns its run record, if any (for `begin`)."""
        previous = self.read_run()
        if previous and previous.get("fingerprint") != run["fingerprint"]:
            changes = identity_changes(previous.get("identity", {}), run["identity"])[:3]
            raise OutputError(
                f"output {self.location.uri()} holds a run made with different settings "
                f"({'; '.join(changes) or 'fingerprint ' + str(previous.get('fingerprint'))}); "
                "use a new output.uri, or delete the old output to start over"
            )
        return previous

    def begin(self, run: dict, previous: dict | None) -> None:
        """Claim the output for this run, once `check_settings` passed; the last summary stays until
        this run writes its own."""
        if previous and "summary" in previous:
            run = {**run, "summary": previous["summary"]}
        self.write_run(run)

    def committed(self) -> set[str]:
        return {n.removesuffix(".json") for n in self.location.list_names(FRAGMENTS_DIR) if n.endswith(".json")}

    def record(self, fragment: str) -> CommitRecord:
        return CommitRecord(**json.loads(self.location.read_bytes(FRAGMENTS_DIR, f"{fragment}.json")))

    def commit(self, record: CommitRecord) -> None:
        self.location.write_bytes(json.dumps(asdict(record)).encode(), FRAGMENTS_DIR, f"{record.fragment}.json")

    def fail(self, record: FailureRecord) -> None:
        self.location.write_bytes(json.dumps(asdict(record)).encode(), FAILURES_DIR, f"{record.fragment}.json")

    def failures(self) -> list[FailureRecord]:
        names = sorted(n for n in self.location.list_names(FAILURES_DIR) if n.endswith(".json"))
        return [FailureRecord(**json.loads(self.location.read_bytes(FAILURES_DIR, n))) for n in names]

    def clear_failures(self) -> None:
        """A new run retries everything that failed before; its own failures are recorded anew."""
        for name in self.location.list_names(FAILURES_DIR):
            self.location.remove(FAILURES_DIR, name)
        self.clear_attempts()

    def note_attempt(self, fragment: str) -> None:
        """Written as a fragment's embedding starts; a worker that dies leaves it behind."""
        self.location.write_bytes(b"", ATTEMPTS_DIR, f"{fragment}.{uuid.uuid4().hex[:12]}")

    def attempts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name in self.location.list_names(ATTEMPTS_DIR):
            fragment = name.rsplit(".", 1)[0]
            counts[fragment] = counts.get(fragment, 0) + 1
        return counts

    def clear_attempts(self) -> None:
        for name in self.location.list_names(ATTEMPTS_DIR):
            self.location.remove(ATTEMPTS_DIR, name)

    def remove_uncommitted(self, committed: set[str]) -> list[str]:
        """Delete data and quarantine files that no commit record accounts for (a run stopped
        between writing them and committing) and leftover temporary files, so that a reader of
        data/ never sees a document twice. Returns what was removed."""
        candidates = self.location.find("data") + self.location.find("quarantine") + self.location.find(HASHES_DIR)
        candidates += [f"{FRAGMENTS_DIR}/{name}" for name in self.location.list_names(FRAGMENTS_DIR)]
        removed = []
        for path in candidates:
            name = posixpath.basename(path)
            orphan = name.endswith(".parquet") and name.removesuffix(".parquet") not in committed
            if name.startswith(TEMP_PREFIX) or (orphan and not path.startswith(FRAGMENTS_DIR)):
                self.location.remove(path)
                removed.append(path)
        return removed

    def remove_fragments(self, records: list[CommitRecord]) -> int:
        """Delete committed fragments: the record first (so a crash leaves files without a record,
        which the next run removes), then data, quarantine and hash files. Returns files removed."""
        removed = 0
        for record in records:
            self.location.remove(FRAGMENTS_DIR, f"{record.fragment}.json")
            paths = [*record.files, *([record.quarantine_file] if record.quarantine_file else []),
                     f"{HASHES_DIR}/{record.fragment}.parquet"]
            for path in paths:
                if self.location.exists(path):
                    self.location.remove(path)
                    removed += 1
        return removed

    def records(self, fragment_ids: set[str] | None = None) -> list[CommitRecord]:
        """Commit records, of every committed fragment or of the given ones."""
        return [self.record(fid) for fid in sorted(self.committed() if fragment_ids is None else fragment_ids)]


def check_writable(location: Location) -> None:
    """Fail early, with the path in the message, when the output cannot be created."""
    try:
        location.fs.makedirs(location.path(FRAGMENTS_DIR), exist_ok=True)
        probe = location.path("_manifest", ".write-probe")
        location.fs.pipe_file(probe, b"ok")
        location.fs.rm(probe)
    except Exception as exc:  # noqa: BLE001 - a local permission error, an unreachable or denied bucket, ...
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc)
        raise OutputError(f"output.uri {location.uri()} is not writable: {reason}") from None
