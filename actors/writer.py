"""Write stage: encode each image, store it create-only under its deterministic key, and make its result row."""
from __future__ import annotations

import hashlib
import io
import logging
import time

import pyarrow as pa

from actors.base import error_text
from actors.rows import FAILED, INVALID, PENDING, TIMED_STAGES, from_table, load_row, unpack
from schemas.job import S3Settings
from schemas.keys import image_key
from schemas.result import ResultRow, results_to_table, utc_now

log = logging.getLogger(__name__)

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def encode_image(pixels, image_format: str, quality: int) -> bytes:
    """uint8 (H, W, 3) pixels as PNG, JPEG or WebP bytes; the same pixels always give the same bytes."""
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(pixels)
    if image_format == "png":
        image.save(buf, format="PNG")
    elif image_format == "jpeg":
        image.save(buf, format="JPEG", quality=quality)
    elif image_format == "webp":
        image.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unknown image format {image_format!r}")
    return buf.getvalue()


class WriteStage:
    """A Ray Data callable class: units in, result rows (the result shard schema) out.

    An image is stored with `put_if_absent`: a rerun, or a retry after a crash, never writes a second object, and
    when the key already exists the result describes the stored object (its sha256 and size), not the new bytes.
    """

    def __init__(self, output_uri: str, *, s3: S3Settings | None = None, image_format: str = "png",
                 quality: int = 95, model_identity: dict | None = None, passthrough: pa.Schema | None = None):
        from storage import open_store

        self.store = open_store(output_uri, s3)
        self.image_format = image_format
        self.quality = quality
        self.extension = EXTENSIONS[image_format]
        identity = model_identity or {}
        self.model_fields = {"model_name": identity.get("name"), "model_hash": identity.get("hash")}
        self.passthrough = passthrough

    def __call__(self, table: pa.Table) -> pa.Table:
        results = [self.result_for(unit) for unit in from_table(table)]
        return results_to_table(results, self.passthrough)

    def result_for(self, unit: dict) -> ResultRow:
        row = load_row(unit["row"])
        if unit["status"] == INVALID:
            return ResultRow.from_invalid(row, finished_at=utc_now())
        common = dict(
            image_index=unit["image_index"], attempts=unit["attempts"], width=unit["width"], height=unit["height"],
            bucket=unit["bucket"], size_snapped=unit["size_snapped"], started_at=unit["started_at"],
            fusion=unit["fusion"],
            **self.model_fields, **{f"{stage}_s": unit[f"{stage}_s"] for stage in TIMED_STAGES},
        )
        if unit["status"] == PENDING:
            start = time.perf_counter()
            try:
                stored = self.store_image(row.row_id, unit["image_index"], row.num_images, unit["pixels"])
            except Exception as exc:  # noqa: BLE001 - one row's storage error must not stop the others
                log.warning("write: row %r image %d failed: %s", row.row_id, unit["image_index"], exc)
                return ResultRow.from_row(row, status=FAILED, error=error_text("write", exc),
                                          finished_at=utc_now(), **common)
            return ResultRow.from_row(row, status="ok", write_s=time.perf_counter() - start,
                                      finished_at=utc_now(), **stored, **common)
        return ResultRow.from_row(row, status=FAILED, error=unit["error"] or "failed", finished_at=utc_now(), **common)

    def store_image(self, row_id: str, image_index: int, num_images: int, pixels: bytes) -> dict:
        image = unpack(pixels)["image"]
        data = encode_image(image, self.image_format, self.quality)
        key = image_key(row_id, image_index, num_images, self.extension)
        if not self.store.put_if_absent(key, data, CONTENT_TYPES[self.image_format]):
            existing = self.store.get(key)
            if existing != data:
                log.warning("%s already exists with other bytes; keeping the stored image", self.store.uri_for(key))
            data = existing
        return {
            "image_uri": self.store.uri_for(key), "image_key": key,
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
        }
