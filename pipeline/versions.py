"""Output versions: every run that changes an output publishes version N, a snapshot manifest
of the fragments (and so the data files) that make up the output at that version.

    _manifest/versions/00000002.json                  the snapshot: files, fragments (their
                                                      commit records), shards, counts, settings
    _manifest/versions/00000002/changes/<shard>.parquet   per shard that changed since version 1:
                                                      id, row, change (added | changed |
                                                      unchanged | deleted), where its old rows are

A snapshot is written once, after every fragment it lists is committed, and never rewritten;
the current version is the highest one. A changed shard's fragments are written anew (its
unchanged documents' rows copied, not embedded), so a snapshot is a plain list of whole files:
readers need no row-level deletes. Older versions stay readable until `strata gc` drops them.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import OutputError, one_line
from pipeline.manifest import CommitRecord, damaged, read_json, record_from
from pipeline.storage import Location

VERSIONS_DIR = "_manifest/versions"
_SNAPSHOT = re.compile(r"^(\d{8})\.json$")


@dataclass
class Snapshot:
    version: int
    fingerprint: str  # of the settings that made every vector in it
    kind: str  # first | incremental | full (every document embedded again: the settings changed)
    counts: dict[str, int]  # docs, embedded, added, changed, deleted, carried, quarantined, blank, rows, tokens
    shards: dict[str, str]  # source -> the shard version this snapshot holds
    fragments: list[CommitRecord]
    reason: str = ""  # why a full re-embed
    identity: dict = field(default_factory=dict)  # the settings behind `fingerprint`, to say what changed
    lease_generation: int = 0  # the fencing token of the run that published it (lease.py)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def files(self) -> list[str]:
        """The data files, relative to the output root."""
        return [path for record in self.fragments for path in record.files]

    def to_json(self) -> bytes:
        data = asdict(self)
        data["files"] = self.files  # for readers: DuckDB and pyarrow take this list as it is
        data["quarantine_files"] = [r.quarantine_file for r in self.fragments if r.quarantine_file]
        return json.dumps(data, indent=1).encode()

    @classmethod
    def from_dict(cls, raw: dict) -> "Snapshot":
        """The inverse of `to_json`'s data; KeyError, TypeError or ValueError for anything else."""
        raw = dict(raw)
        fragments = [record_from(record, CommitRecord, ValueError) for record in raw.pop("fragments")]
        raw.pop("files", None)
        raw.pop("quarantine_files", None)
        return cls(fragments=fragments, **raw)


def snapshot_path(version: int) -> str:
    return f"{VERSIONS_DIR}/{version:08d}.json"


def changes_dir(version: int) -> str:
    return f"{VERSIONS_DIR}/{version:08d}/changes"


def list_versions(location: Location) -> list[int]:
    """Published versions, oldest first."""
    return sorted(int(m.group(1)) for name in location.list_names(VERSIONS_DIR) if (m := _SNAPSHOT.match(name)))


def read_snapshot(location: Location, version: int | None = None) -> Snapshot | None:
    """A published version (the current one by default); None when the output has none yet."""
    if version is None:
        published = list_versions(location)
        if not published:
            return None
        version = published[-1]
    elif not location.exists(snapshot_path(version)):
        return None
    path = snapshot_path(version)
    try:
        snapshot = Snapshot.from_dict(read_json(location, path, dict))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise damaged(location, path, f"it is not a version snapshot ({one_line(exc)})") from None
    for name, kind in (("version", int), ("fingerprint", str), ("kind", str), ("counts", dict), ("shards", dict)):
        if not isinstance(getattr(snapshot, name), kind):
            raise damaged(location, path, f"its {name!r} is not a{'n' if kind is int else ''} {kind.__name__}")
    return snapshot


def all_snapshots(location: Location) -> list[Snapshot]:
    """Every published version, oldest first."""
    return [read_snapshot(location, version) for version in list_versions(location)]


def data_schema(location: Location, snapshot: Snapshot) -> pa.Schema:
    """The Parquet schema (and strata.* metadata) of a version's data, read from its first file."""
    with location.fs.open(location.path(snapshot.files[0]), "rb") as f:
        return pq.read_schema(f)


def publish(location: Location, snapshot: Snapshot) -> None:
    location.write_bytes(snapshot.to_json(), snapshot_path(snapshot.version))


@dataclass(frozen=True)
class Collection:
    """What `strata gc --keep N` removes: versions, and the fragments only they list."""

    versions: list[int]
    fragments: list[CommitRecord]


def collectable(snapshots: list[Snapshot], keep: int) -> Collection:
    """The versions older than the newest `keep`, and their fragments that no kept version
    lists. Fragments in no snapshot at all (an unfinished run's) are never collected here."""
    ordered = sorted(snapshots, key=lambda s: s.version)
    dropped, kept = ordered[:-keep] if keep < len(ordered) else [], ordered[-keep:]
    live = {record.fragment for snapshot in kept for record in snapshot.fragments}
    gone = {record.fragment: record for snapshot in dropped for record in snapshot.fragments
            if record.fragment not in live}
    return Collection([s.version for s in dropped], sorted(gone.values(), key=lambda r: r.fragment))


def files(output_uri: str, version: int | None = None, storage=None) -> list[str]:
    """The data files of a version (the current one by default) as URIs a reader opens."""
    location = Location.from_uri(output_uri, storage)
    snapshot = read_snapshot(location, version)
    if snapshot is None:
        which = "any published version" if version is None else f"a version {version}"
        raise OutputError(f"{output_uri} holds no {which} (see strata status {output_uri})")
    return [location.uri(path) for path in snapshot.files]


def collect_garbage(location: Location, keep: int, dry_run: bool = False) -> Collection:
    """Remove the versions older than the newest `keep` and the fragments (data, quarantine and
    hash files, commit records) only they list. Holds the output's lease, as a run does: a run
    and a collection never overlap. Snapshots go first, so a crash midway leaves only fragments
    no version lists, which the next run removes."""
    from pipeline.lease import Lease
    from pipeline.manifest import Manifest

    snapshots = all_snapshots(location)
    if not snapshots:
        raise OutputError(f"{location.uri()} holds no published version; nothing to collect")
    collection = collectable(snapshots, keep)
    if dry_run or not collection.versions:
        return collection
    lease = Lease(location)
    lease.acquire()
    with lease:
        location = lease.fenced(location)  # a collection whose lease was taken over removes nothing more
        for version in collection.versions:
            location.remove(snapshot_path(version))
            if location.exists(f"{VERSIONS_DIR}/{version:08d}"):
                location.guard()
                location.fs.rm(location.path(f"{VERSIONS_DIR}/{version:08d}"), recursive=True)
        Manifest(location, lease.generation).remove_fragments(collection.fragments)
    return collection
