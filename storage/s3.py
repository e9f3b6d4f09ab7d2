"""A store under an `s3://bucket/prefix` on any S3-compatible service (AWS, MinIO, Huawei OBS)."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import boto3
import botocore.exceptions as bexc
import pyarrow.fs as pafs
from botocore.config import Config

from schemas.errors import UserError
from schemas.job import S3Settings
from storage.base import NotFound, StorageError, Store, check_key

logger = logging.getLogger(__name__)

_DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
           "InvalidToken", "AllAccessDisabled", "AccountProblem"}
_MISSING_KEY = {"NoSuchKey", "404", "NotFound"}
_UNREACHABLE = (bexc.EndpointConnectionError, bexc.ConnectTimeoutError, bexc.ReadTimeoutError,
                bexc.ConnectionClosedError, bexc.SSLError)


def redact_url(url: str | None) -> str | None:
    """`url` without any user:password part, for messages and logs."""
    if not url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _secret(value) -> str | None:
    return None if value is None else value.get_secret_value()


class S3Store(Store):
    """Objects under `s3://bucket/prefix`. Settings left None come from the standard AWS environment."""

    def __init__(self, bucket: str, prefix: str = "", s3: S3Settings | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.root_uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.settings = s3 or S3Settings()
        self.endpoint_url = (self.settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                             or os.environ.get("AWS_ENDPOINT_URL") or None)
        self.region = (self.settings.region or os.environ.get("AWS_REGION")
                       or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
        self._session = boto3.session.Session(
            aws_access_key_id=_secret(self.settings.access_key_id),
            aws_secret_access_key=_secret(self.settings.secret_access_key),
            aws_session_token=_secret(self.settings.session_token),
            region_name=self.region,
        )
        config = Config(
            # boto3 >= 1.36 sends CRC checksums that several S3-compatible stores reject.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": self.settings.retry_mode, "max_attempts": self.settings.max_attempts},
            s3={"addressing_style": self.settings.addressing_style},
            connect_timeout=self.settings.connect_timeout_s,
            read_timeout=self.settings.read_timeout_s,
        )
        self._client = self._session.client("s3", endpoint_url=self.endpoint_url, config=config)
        # Stores that answer NotImplemented to If-None-Match get check-then-put from then on.
        self._conditional_put = True

    def __repr__(self) -> str:
        return f"S3Store({self.root_uri!r}, endpoint={redact_url(self.endpoint_url)!r})"

    def _object_key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, action: str, key: str = "") -> Iterator[None]:
        """Turn S3 failures into UserError (the user can fix them), NotFound, or StorageError."""
        where = f"{self.root_uri}/{key}" if key else self.root_uri
        endpoint = redact_url(self.endpoint_url) or "the default AWS endpoint"
        try:
            yield
        except bexc.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                raise UserError(f"S3 bucket '{self.bucket}' does not exist at {endpoint}: create it, or correct the "
                                f"bucket in the URI {self.root_uri} (or the endpoint)") from exc
            if code in _DENIED:
                raise UserError(f"S3 denied {action} {where} ({code}): check the access key id and secret "
                                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the job's s3 settings), the region, "
                                "and the bucket's permissions") from exc
            if code in _MISSING_KEY:
                raise NotFound(f"{where} does not exist") from None
            raise StorageError(f"S3 {action} {where} failed: {code}: "
                               f"{exc.response.get('Error', {}).get('Message', '')}") from exc
        except bexc.NoCredentialsError as exc:
            raise UserError("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                            "s3.access_key_id and s3.secret_access_key in the job spec") from exc
        except _UNREACHABLE as exc:
            raise UserError(f"cannot reach the S3 endpoint {endpoint} for {action} {where}: check AWS_ENDPOINT_URL "
                            "(or s3.endpoint_url) and that the service is up") from exc

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        with self._errors("writing", key):
            self._client.put_object(Bucket=self.bucket, Key=self._object_key(key), Body=bytes(data), **extra)

    def put_if_absent(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        extra = {"ContentType": content_type} if content_type else {}
        object_key = self._object_key(key)
        if self._conditional_put:
            for _ in range(3):
                try:
                    with self._errors("writing", key):
                        self._client.put_object(Bucket=self.bucket, Key=object_key, Body=bytes(data),
                                                IfNoneMatch="*", **extra)
                    return True
                except StorageError as exc:
                    code = _error_code(exc)
                    if code in ("PreconditionFailed", "412"):
                        return False
                    if code == "ConditionalRequestConflict":  # a concurrent create is in flight: ask again
                        continue
                    if code not in ("NotImplemented", "501"):
                        raise
                    logger.info("%s does not support conditional writes; create-only falls back to "
                                "check-then-put", redact_url(self.endpoint_url) or "the S3 endpoint")
                    self._conditional_put = False
                    break
            else:
                return False
        if self.exists(key):
            return False
        self.put(key, data, content_type)
        return True

    def get(self, key: str) -> bytes:
        with self._errors("reading", key):
            response = self._client.get_object(Bucket=self.bucket, Key=self._object_key(key))
            return response["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            with self._errors("reading", key):
                self._client.head_object(Bucket=self.bucket, Key=self._object_key(key))
            return True
        except NotFound:
            return False

    def list(self, prefix: str = "") -> list[str]:
        check_key(prefix, allow_empty=True)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        cut = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        with self._errors("listing", prefix):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(item["Key"][cut:] for item in page.get("Contents", ()))
        return sorted(k for k in keys if k and not k.endswith("/"))

    def delete(self, key: str) -> None:
        with self._errors("deleting", key):
            self._client.delete_object(Bucket=self.bucket, Key=self._object_key(key))

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def arrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        credentials = self._session.get_credentials()
        frozen = credentials.get_frozen_credentials() if credentials else None
        options = dict(
            region=self.region,
            connect_timeout=self.settings.connect_timeout_s,
            request_timeout=self.settings.read_timeout_s,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=self.settings.max_attempts),
            force_virtual_addressing=self.settings.addressing_style == "virtual",
        )
        if frozen is not None:
            options.update(access_key=frozen.access_key, secret_key=frozen.secret_key,
                           session_token=frozen.token or None)
        if self.endpoint_url:
            parts = urlsplit(self.endpoint_url)
            host = parts.netloc.rpartition("@")[2]
            options.update(scheme=parts.scheme or "https", endpoint_override=host + parts.path.rstrip("/"))
        base = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        return pafs.S3FileSystem(**options), base


def _error_code(exc: StorageError) -> str:
    cause = exc.__cause__
    if isinstance(cause, bexc.ClientError):
        return str(cause.response.get("Error", {}).get("Code", ""))
    return ""
