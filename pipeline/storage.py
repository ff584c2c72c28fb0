"""One storage vocabulary over fsspec: local paths and object stores (s3://, ...) are the same code.

A `Location` is a filesystem plus a root path; everything strata reads or writes goes through
it, so object storage drops in without touching the rest of the pipeline.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import posixpath
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import fsspec
from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import StorageConfig
from pipeline.errors import StrataError, one_line

TEMP_PREFIX = "."  # a write in progress; hidden from dataset readers, removed on resume
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp-[0-9a-f]{8}$")


S3_PROTOCOLS = ("s3", "s3a")


class StorageError(StrataError):
    """Storage refused or could not be reached: the cause, and the file or folder it concerns."""


class Conflict(StrataError):
    """A conditional write found the object other than expected: present when it was to be
    created, changed or gone when it was to be replaced."""


def storage_options(uri: str, storage: StorageConfig | None) -> dict:
    """fsspec options for a URI: endpoint, region, profile, retries and timeouts for S3."""
    storage = storage or StorageConfig()
    protocol = fsspec.core.split_protocol(uri)[0]
    if protocol not in S3_PROTOCOLS:
        return dict(storage.options)
    client = {key: value for key, value in (("endpoint_url", storage.endpoint_url),
                                            ("region_name", storage.region)) if value}
    options = {
        "anon": storage.anonymous,
        "client_kwargs": client,
        "config_kwargs": {"retries": {"max_attempts": storage.retries + 1, "mode": "adaptive"},
                          "connect_timeout": storage.connect_timeout},
    }
    if storage.profile:
        options["profile"] = storage.profile
    return {**options, **storage.options}


def open_fs(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for any URI: a local path, s3://, or another fsspec protocol.
    StorageError when the protocol's driver is not installed or its server cannot be reached
    (some drivers connect as they open: ftp, hdfs). `memory://` is refused: it dies with the process."""
    if fsspec.core.split_protocol(uri)[0] == "memory":
        raise StorageError(f"{uri}: a memory:// location lives only inside one process; strata's workers and "
                           "later runs could never see it (use a folder or object storage)")
    try:
        return fsspec.core.url_to_fs(uri, **storage_options(uri, storage))
    except Exception as exc:  # noqa: BLE001 - ImportError (gcsfs missing), socket errors, a JVM that is not there
        raise StorageError(f"cannot open {uri}: {one_line(exc)}") from None


def _io(action: str):
    """Turn what storage raises (a full or read-only disk, no credentials, an endpoint that does not
    answer) into one StorageError line naming the path; a missing file stays FileNotFoundError."""

    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except (FileNotFoundError, StrataError):
                raise
            except Exception as exc:  # noqa: BLE001 - see above
                parts = [a for a in args if isinstance(a, str)]
                cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc)
                raise StorageError(f"cannot {action} {self.uri(*parts)}: {cause}") from None

        return run

    return wrap


@dataclass(frozen=True)
class Location:
    fs: fsspec.AbstractFileSystem
    root: str  # path inside fs, no protocol, no trailing slash
    # called before every write and removal: raises when this process may no longer change the
    # output (a run whose lease was taken over, see lease.py); never shipped to workers
    fence: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_uri(cls, uri: str, storage: StorageConfig | None = None) -> "Location":
        fs, path = open_fs(uri, storage)
        return cls(fs, path.rstrip("/") or "/")

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def is_s3(self) -> bool:
        return any(p in S3_PROTOCOLS for p in ([self.fs.protocol] if isinstance(self.fs.protocol, str)
                                                else self.fs.protocol))

    @property
    def conditional(self) -> bool:
        """Whether `write_if` is atomic here: a local disk (a lock on the folder) and S3 (conditional
        PUT: `If-None-Match: *`, `If-Match: <etag>`). Elsewhere it reads, compares, then writes."""
        return self.is_local or self.is_s3

    def __getstate__(self) -> dict:
        return {"fs": self.fs, "root": self.root, "fence": None}  # a fence belongs to one process

    def __setstate__(self, state: dict) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)

    def guard(self) -> None:
        """Raise what the fence raises when this process may no longer change the output."""
        if self.fence is not None:
            self.fence()

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri(self, *parts: str) -> str:
        return self.fs.unstrip_protocol(self.path(*parts)) if not self.is_local else self.path(*parts)

    @_io("reach")
    def exists(self, *parts: str) -> bool:
        self.fs.invalidate_cache(self.path(*parts))  # other processes write here too: never trust a cached listing
        return self.fs.exists(self.path(*parts))

    @_io("read")
    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    @_io("read")
    def read_optional(self, *parts: str) -> bytes | None:
        """A file's bytes, or None when there is none (one request on object storage, where an
        `exists` first would cost one or two more)."""
        try:
            return self.fs.cat_file(self.path(*parts))
        except FileNotFoundError:
            return None

    @_io("write")
    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a whole object so that readers never see it half-written.

        Locally: a hidden temporary sibling (`.name.tmp-…`, which pyarrow and DuckDB readers skip)
        then an atomic rename. On object storage a single PUT is already all-or-nothing.
        """
        self.guard()
        target = self.path(*parts)
        if not self.is_local:
            self.fs.pipe_file(target, data)
            return
        folder, name = posixpath.split(target)
        self.fs.makedirs(folder, exist_ok=True)
        temp = posixpath.join(folder, temp_name(name))
        self.fs.pipe_file(temp, data)
        self.fs.mv(temp, target)

    @_io("read")
    def read_tagged(self, *parts: str) -> tuple[bytes, str] | None:
        """A file's bytes and its tag (S3: the ETag, read in the same request; elsewhere: a hash of
        the bytes), for a later `write_if`; None when there is no such file."""
        target = self.path(*parts)
        if self.is_s3:
            bucket, key, _ = self.fs.split_path(target)
            return sync(self.fs.loop, _s3_get, self.fs, bucket, key)
        try:
            data = self.fs.cat_file(target)
        except FileNotFoundError:
            return None
        return data, content_tag(data)

    @_io("write")
    def write_if(self, data: bytes, *parts: str, tag: str | None) -> str:
        """Write a whole object only if it is still as last read: absent (`tag` None) or with that
        tag. Returns the new tag; Conflict when the object is otherwise. Atomic where `conditional`
        (S3's conditional PUT; locally under an exclusive lock on the folder, then a rename), else
        compare-then-write. Not fenced: this is what a lease is made of."""
        target = self.path(*parts)
        if self.is_s3:
            bucket, key, _ = self.fs.split_path(target)
            condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
            try:
                answer = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
            except FileNotFoundError:  # If-Match on an object that is gone
                raise Conflict(f"{self.uri(*parts)} is gone") from None
            except OSError as exc:
                if _precondition_failed(exc):
                    raise Conflict(f"{self.uri(*parts)} {'exists' if tag is None else 'changed'}") from None
                raise
            finally:
                self.fs.invalidate_cache(target)
            return answer["ETag"].strip('"')
        folder, name = posixpath.split(target)
        if self.is_local:  # elsewhere a folder is a key prefix (and makedirs would create a bucket)
            self.fs.makedirs(folder, exist_ok=True)
        with _folder_lock(folder) if self.is_local else _nothing():
            found = self.read_tagged(*parts)
            if (found is None) != (tag is None) or (found is not None and found[1] != tag):
                raise Conflict(f"{self.uri(*parts)} {'exists' if tag is None else 'changed'}")
            if self.is_local:
                temp = posixpath.join(folder, temp_name(name))
                self.fs.pipe_file(temp, data)
                self.fs.mv(temp, target)
            else:
                self.fs.pipe_file(target, data)
        return content_tag(data)

    @_io("list")
    def list_names(self, *parts: str) -> list[str]:
        """Base names of the files directly under a folder; empty if the folder does not exist."""
        folder = self.path(*parts)
        self.fs.invalidate_cache(folder)
        try:
            entries = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        return [posixpath.basename(e.rstrip("/")) for e in entries]

    @_io("list")
    def list_sizes(self, *parts: str) -> dict[str, int]:
        """Base name -> size in bytes of the files directly under a folder (one listing)."""
        folder = self.path(*parts)
        self.fs.invalidate_cache(folder)
        try:
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in entries
                if e.get("type") != "directory"}

    @_io("list")
    def find(self, *parts: str) -> list[str]:
        """Paths (relative to the root) of every file below a folder; empty if there is none."""
        self.fs.invalidate_cache(self.path(*parts))
        try:
            found = self.fs.find(self.path(*parts))
        except FileNotFoundError:
            return []
        return [posixpath.relpath(path, self.root) for path in found]

    @_io("remove")
    def remove(self, *parts: str) -> None:
        self.guard()
        self.fs.rm(self.path(*parts))

    @_io("remove")
    def remove_many(self, paths: list[str]) -> None:
        """Remove files (paths relative to the root) in as few requests as the store allows (S3:
        one DeleteObjects per 1,000); one already gone is no error."""
        if not paths:
            return
        self.guard()
        try:
            self.fs.rm([self.path(path) for path in paths])
        except FileNotFoundError:
            for path in paths:  # some were gone: the rest one by one
                try:
                    self.fs.rm(self.path(path))
                except FileNotFoundError:
                    pass

    @_io("reach")
    def enclosing(self, marker: str, max_levels: int = 32) -> str | None:
        """The nearest folder above the root that holds `marker` (a relative path), if any."""
        folder = self.root
        for _ in range(max_levels):
            parent = posixpath.dirname(folder)
            if parent == folder or not parent:
                return None
            folder = parent
            if self.fs.exists(posixpath.join(folder, marker)):
                return self.fs.unstrip_protocol(folder) if not self.is_local else folder
        return None

    @_io("list")
    def some_files(self, limit: int, ignore: set[str] = frozenset(), max_folders: int = 64) -> list[str]:
        """Up to `limit` files (relative paths) below the root, breadth first, looking into at most
        `max_folders` folders: enough to tell an empty folder (or one of empty folders) from one
        that holds something, without listing a large tree."""
        found, queue, seen = [], [self.root], 0
        while queue and len(found) < limit and seen < max_folders:
            folder, seen = queue.pop(0), seen + 1
            self.fs.invalidate_cache(folder)
            try:
                entries = self.fs.ls(folder, detail=True)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in sorted(entries, key=lambda e: e["name"]):
                path = entry["name"].rstrip("/")
                if entry.get("type") == "directory":
                    queue.append(path)
                elif (rel := posixpath.relpath(path, self.root)) not in ignore:
                    found.append(rel)
        return found[:limit] if found or not queue else [f"{posixpath.relpath(queue[0], self.root)}/..."]


def content_tag(data: bytes) -> str:
    """The tag `read_tagged` gives a file outside S3: its sha256, as hex."""
    return hashlib.sha256(data).hexdigest()


async def _s3_get(fs, bucket: str, key: str) -> tuple[bytes, str] | None:
    """One GET: the object's bytes and ETag together (so the tag is the one of these bytes)."""
    try:
        answer = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return None
    async with answer["Body"] as body:
        data = await body.read()
    return data, answer["ETag"].strip('"')


def _precondition_failed(exc: OSError) -> bool:
    """s3fs turns 412 PreconditionFailed into OSError(EINVAL); a concurrent conditional write is
    409 ConditionalRequestConflict (AWS)."""
    text = f"{exc} {exc.__cause__ or ''}"
    return "PreconditionFailed" in text or "ConditionalRequestConflict" in text or "412" in text or \
        (exc.errno == 22 and "Precondition" in text)


@contextmanager
def _folder_lock(folder: str):
    """An exclusive lock on a local folder (flock on its descriptor): held for one read-compare-write;
    the kernel lets go when the process dies."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def _nothing():
    yield


def temp_name(name: str) -> str:
    """The hidden name a local write of `name` goes to before its rename: `.name.tmp-1a2b3c4d`."""
    return f"{TEMP_PREFIX}{name}.tmp-{uuid.uuid4().hex[:8]}"


def temp_target(name: str) -> str | None:
    """The file a temporary name of `temp_name` was going to become; None for any other name."""
    match = _TEMP_NAME.match(name)
    return match.group("target") if match else None


def overlap(a: str, b: str) -> bool:
    """Whether one URI is the other or lies inside it (same filesystem; local paths resolved
    through symlinks, globs by the folder before their first wildcard)."""
    (proto_a, path_a), (proto_b, path_b) = (_comparable(uri) for uri in (a, b))
    if proto_a != proto_b:
        return False
    return path_a == path_b or path_a.startswith(path_b + "/") or path_b.startswith(path_a + "/")


def _comparable(uri: str) -> tuple[str, str]:
    protocol, path = fsspec.core.split_protocol(uri)
    protocol = {"s3a": "s3", "file": None, "local": None}.get(protocol, protocol)
    parts = path.split("/")
    for i, part in enumerate(parts):  # a glob: the folder before its first wildcard
        if fsspec.core.has_magic(part):
            path = "/".join(parts[:i]) or "/"
            break
    if protocol is None:
        return "", os.path.realpath(os.path.expanduser(path))
    return protocol, path.strip("/")
