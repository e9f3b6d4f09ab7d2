"""From a URI to a store: `s3://bucket/prefix`, `file:///path` or a plain path."""
from __future__ import annotations

import re
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

from schemas.errors import UserError
from schemas.job import S3Settings
from storage.base import Store
from storage.local import LocalStore

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _local_path(uri: str) -> str:
    """The filesystem path of a `file://` URI or a plain path."""
    if not uri.startswith("file://"):
        return uri
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise UserError(f"{uri}: file URIs must name a local path (file:///path), not host {parts.netloc!r}")
    return unquote(parts.path)


def _s3_parts(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise UserError(f"{uri}: {bucket!r} is not a valid S3 bucket name (3-63 lower-case letters, digits, '.', '-')")
    return bucket, prefix.strip("/")


def open_store(uri: str, s3: S3Settings | None = None) -> Store:
    """A store rooted at `uri`: `s3://bucket[/prefix]`, `file:///path` or a plain (relative or absolute) path."""
    uri = str(uri)
    match = _SCHEME.match(uri)
    scheme = match.group(1).lower() if match else ""
    if scheme == "s3":
        from storage.s3 import S3Store  # boto3 loads only when S3 is used

        bucket, prefix = _s3_parts(uri)
        return S3Store(bucket, prefix, s3)
    if scheme in ("", "file"):
        return LocalStore(_local_path(uri))
    raise UserError(f"{uri}: unsupported storage scheme {scheme!r}; use s3://bucket/prefix, file:///path or a path")


def split_uri(uri: str) -> tuple[str, str]:
    """Split the URI of one object into (root URI, key): `s3://b/x/y.png` -> (`s3://b/x`, `y.png`)."""
    uri = str(uri)
    if uri.startswith("s3://"):
        bucket, key = _s3_parts(uri)
        if not key:
            raise UserError(f"{uri} names a bucket, not an object")
        parent, _, name = key.rpartition("/")
        return (f"s3://{bucket}/{parent}" if parent else f"s3://{bucket}"), name
    if uri.startswith("file://"):
        path = PurePosixPath(_local_path(uri))
        if not path.name:
            raise UserError(f"{uri} names a folder, not a file")
        return PurePosixPath(path.parent).as_uri() if path.is_absolute() else str(path.parent), path.name
    if _SCHEME.match(uri):
        raise UserError(f"{uri}: unsupported storage scheme; use s3://bucket/key, file:///path or a path")
    path = PurePosixPath(uri)
    if not path.name or uri.endswith("/"):
        raise UserError(f"{uri} names a folder, not a file")
    return str(path.parent), path.name


def read_uri(uri: str, s3: S3Settings | None = None) -> bytes:
    """The bytes of one object named by a full URI or path (a control image, a manifest file)."""
    root, key = split_uri(uri)
    return open_store(root, s3).get(key)
