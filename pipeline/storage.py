"""One storage vocabulary over fsspec: local paths and object stores (s3://, ...) are the same code.

A `Location` is a filesystem plus a root path; everything strata reads or writes goes through
it, so object storage drops in without touching the rest of the pipeline.
"""

from __future__ import annotations

import posixpath
import uuid
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import StorageConfig

TEMP_PREFIX = "."  # a write in progress; hidden from dataset readers, removed on resume


S3_PROTOCOLS = ("s3", "s3a")


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
    """(filesystem, path inside it) for any URI: a local path, s3://, or another fsspec protocol."""
    return fsspec.core.url_to_fs(uri, **storage_options(uri, storage))


@dataclass(frozen=True)
class Location:
    fs: fsspec.AbstractFileSystem
    root: str  # path inside fs, no protocol, no trailing slash

    @classmethod
    def from_uri(cls, uri: str, storage: StorageConfig | None = None) -> "Location":
        fs, path = open_fs(uri, storage)
        return cls(fs, path.rstrip("/") or "/")

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri(self, *parts: str) -> str:
        return self.fs.unstrip_protocol(self.path(*parts)) if not self.is_local else self.path(*parts)

    def exists(self, *parts: str) -> bool:
        self.fs.invalidate_cache(self.path(*parts))  # other processes write here too: never trust a cached listing
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a whole object so that readers never see it half-written.

        Locally: a hidden temporary sibling (`.name.tmp-…`, which pyarrow and DuckDB readers skip)
        then an atomic rename. On object storage a single PUT is already all-or-nothing.
        """
        target = self.path(*parts)
        if not self.is_local:
            self.fs.pipe_file(target, data)
            return
        folder, name = posixpath.split(target)
        self.fs.makedirs(folder, exist_ok=True)
        temp = posixpath.join(folder, f"{TEMP_PREFIX}{name}.tmp-{uuid.uuid4().hex[:8]}")
        self.fs.pipe_file(temp, data)
        self.fs.mv(temp, target)

    def list_names(self, *parts: str) -> list[str]:
        """Base names of the files directly under a folder; empty if the folder does not exist."""
        folder = self.path(*parts)
        self.fs.invalidate_cache(folder)
        try:
            entries = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        return [posixpath.basename(e.rstrip("/")) for e in entries]

    def find(self, *parts: str) -> list[str]:
        """Paths (relative to the root) of every file below a folder; empty if there is none."""
        self.fs.invalidate_cache(self.path(*parts))
        try:
            found = self.fs.find(self.path(*parts))
        except FileNotFoundError:
            return []
        return [posixpath.relpath(path, self.root) for path in found]

    def remove(self, *parts: str) -> None:
        self.fs.rm(self.path(*parts))
