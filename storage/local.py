"""A store in a local directory (`file://` URIs and plain paths), the embedded default."""
from __future__ import annotations

import errno
import logging
import os
import re
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage.base import NotFound, Store, check_key

logger = logging.getLogger(__name__)

# Temporary files are written beside their target and renamed into place; listings skip them.
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{32}\.part$")


class LocalStore(Store):
    """Objects as files under `root`; every write goes to a temporary file first, so a half-written file is
    never visible under its key."""

    def __init__(self, root: str | Path):
        self.root = Path(os.path.abspath(os.path.expanduser(str(root))))
        self.root_uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _folder_of(self, prefix: str) -> Path:
        """The deepest folder a key prefix names (walks start there)."""
        check_key(prefix, allow_empty=True)
        return self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root

    def _temp_beside(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")

    @staticmethod
    def _write_synced(path: Path, data: bytes) -> None:
        with open(path, "xb") as f:
            f.write(data)
            f.flush()
            # A file renamed into place must have its bytes on disk first: a shard that exists is a commit.
            os.fsync(f.fileno())

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        path = self._path(key)
        temp = self._temp_beside(path)
        try:
            self._write_synced(temp, bytes(data))
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)

    def put_if_absent(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        path = self._path(key)
        if path.exists():
            return False
        temp = self._temp_beside(path)
        try:
            self._write_synced(temp, bytes(data))
            try:
                # link() fails if the target exists, and the target appears complete: an atomic create-only.
                os.link(temp, path)
                return True
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                # Filesystems without hard links: check, then rename (a concurrent writer may race us).
                logger.debug("hard links unsupported under %s; create-only falls back to check-then-rename", self.root)
                if path.exists():
                    return False
                os.replace(temp, path)
                return True
        finally:
            temp.unlink(missing_ok=True)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"{self.uri_for(key)} does not exist") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        keys = []
        for folder, _dirs, files in os.walk(self._folder_of(prefix)):
            rel = Path(folder).relative_to(self.root).as_posix()
            for name in files:
                if _TEMP_NAME.match(name):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def remove_temporaries(self, prefix: str = "") -> list[str]:
        """Delete the temporary files (`.<name>.<32 hex>.part`) under the folder `prefix` names: a writer killed
        between its write and its rename leaves one behind. Listings skip them; a finished job removes them."""
        removed = []
        for folder, _dirs, files in os.walk(self._folder_of(prefix)):
            for name in files:
                if _TEMP_NAME.match(name):
                    path = Path(folder) / name
                    path.unlink(missing_ok=True)
                    removed.append(path.relative_to(self.root).as_posix())
        return sorted(removed)

    def uri_for(self, key: str) -> str:
        return self._path(key).as_uri()

    def read_parquet(self, key: str) -> pa.Table:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(f"{self.uri_for(key)} does not exist")
        return pq.read_table(str(path), partitioning=None)

    def write_parquet(self, key: str, table: pa.Table) -> None:
        path = self._path(key)
        temp = self._temp_beside(path)
        try:
            pq.write_table(table, str(temp))
            with open(temp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)

    def arrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        return pafs.LocalFileSystem(), self.root.as_posix()
