"""Object keys for row ids: a row id a user wrote may be any string, a key must stay inside its prefix."""
from __future__ import annotations

import hashlib
import re

# Characters allowed in a key taken verbatim from a row id: portable on every filesystem and S3 without escaping.
_SAFE_CHARS = re.compile(r"[A-Za-z0-9._-]+")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9_-]+")
MAX_KEY_LENGTH = 128
# A mapped key ends with this marker and hex digest. Ids of that shape are mapped too, so a verbatim key can never
# equal the mapped key of another id.
_HASH_HEX = 20
_MAPPED_TAIL = re.compile(rf"-h[0-9a-f]{{{_HASH_HEX}}}$")
_PREFIX_LENGTH = 48


def is_safe_key(row_id: str) -> bool:
    """True when `row_id` is used verbatim as its key."""
    return (
        0 < len(row_id) <= MAX_KEY_LENGTH
        and _SAFE_CHARS.fullmatch(row_id) is not None
        and not row_id.startswith(".")
        and not row_id.endswith(".")  # Windows drops trailing dots
        and ".." not in row_id
        and _MAPPED_TAIL.search(row_id) is None
    )


def safe_key(row_id: str) -> str:
    """The object-key stem for a row id: the id itself when safe, else a sanitized prefix plus a sha256 tag.

    The result uses only `[A-Za-z0-9._-]`, so it has no `/`, `\\` or control character; it has no `..` and no
    leading dot, is at most 128 characters, and is deterministic. Distinct ids give distinct keys: a mapped key
    ends with 80 bits of the id's sha256, and a verbatim id never has that ending.
    """
    if not isinstance(row_id, str):
        raise TypeError(f"row id must be a string, got {type(row_id).__name__}")
    if is_safe_key(row_id):
        return row_id
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_HEX]
    prefix = _UNSAFE_RUN.sub("_", row_id).strip("_")[:_PREFIX_LENGTH].strip("_")
    return f"{prefix}-h{digest}" if prefix else f"h{digest}"


def image_key(row_id: str, image_index: int, num_images: int, ext: str) -> str:
    """Key of one image under the output root.

    One image per row: `images/<key>.<ext>`; several: `images/<key>/<index>.<ext>`. A folder per row rather than
    a suffix, because any suffix made of safe characters could equal another row's verbatim id.
    """
    if not 0 <= image_index < num_images:
        raise ValueError(f"image_index {image_index} outside 0..{num_images - 1}")
    ext = ext.lstrip(".").lower()
    if not ext.isalnum():
        raise ValueError(f"bad image extension {ext!r}")
    stem = safe_key(row_id)
    if num_images == 1:
        return f"images/{stem}.{ext}"
    return f"images/{stem}/{image_index}.{ext}"
