"""The store interface every backend implements, its errors, and the key rules."""
from __future__ import annotations

import abc
import io
import re

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StorageError(OSError):
    """A storage operation failed for a reason that is not the user's input (their mistakes raise UserError)."""


class NotFound(StorageError, FileNotFoundError):
    """The key does not exist."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_key(key: str, *, allow_empty: bool = False) -> str:
    """Return `key` when it is a relative `/`-separated key that stays under the store root, else ValueError.

    Rejected: empty (unless `allow_empty`, for list prefixes), absolute, backslashes, control characters, empty
    segments, and `.` or `..` segments.
    """
    if not isinstance(key, str):
        raise ValueError(f"a key must be a string, got {type(key).__name__}")
    if key == "":
        if allow_empty:
            return key
        raise ValueError("empty key")
    if key.startswith("/"):
        raise ValueError(f"key {key!r} is absolute; keys are relative to the store root")
    if "\\" in key or _CONTROL.search(key):
        raise ValueError(f"key {key!r} contains a backslash or a control character")
    segments = key.split("/")
    if allow_empty and segments[-1] == "":
        segments = segments[:-1]  # a list prefix may end with "/"
    for segment in segments:
        if segment in ("", ".", ".."):
            raise ValueError(f"key {key!r} has an empty, '.' or '..' segment")
    return key


class Store(abc.ABC):
    """Objects under one root URI, addressed by relative keys (`images/a.png`)."""

    root_uri: str

    @abc.abstractmethod
    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Write `data` at `key`, replacing what was there; readers never see a partial object."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        """Create `key` only if it does not exist; True when this call created it, False (nothing written) else."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The bytes at `key`; NotFound when missing."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """True when an object exists at `key`."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix` (a plain string prefix of the key), relative to the root, sorted."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; removing a missing key is not an error."""

    @abc.abstractmethod
    def uri_for(self, key: str) -> str:
        """The full URI of `key`."""

    @abc.abstractmethod
    def arrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem and the root's path in it, e.g. for `pyarrow.dataset` or Ray Data reads."""

    def remove_temporaries(self, prefix: str = "") -> list[str]:
        """Remove what writers killed mid-write left under `prefix` (call when no writer is running there); returns
        what was removed. Stores whose writes leave nothing behind (S3 puts are whole) remove nothing."""
        return []

    def read_parquet(self, key: str) -> pa.Table:
        return pq.read_table(pa.BufferReader(self.get(key)))

    def write_parquet(self, key: str, table: pa.Table) -> None:
        """Write `table` as one Parquet object; it appears whole or not at all."""
        sink = io.BytesIO()
        pq.write_table(table, sink)
        self.put(key, sink.getvalue(), content_type="application/vnd.apache.parquet")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root_uri!r})"
