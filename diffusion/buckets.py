"""The 11 aspect buckets, bucket conditioning, and snapping of other sizes to the nearest bucket (SPEC section 3)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# (width, height) near 512x512 area; the index is the bucket id the UNet is conditioned on. Square = 5.
BASE_BUCKETS: tuple[tuple[int, int], ...] = (
    (256, 1024), (256, 960), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (768, 320), (960, 256), (1024, 256),
)
SQUARE_BUCKET = 5


@dataclass(frozen=True)
class SizeChoice:
    """The size a request is generated at, and how it was reached."""

    width: int
    height: int
    bucket: int
    scale: float
    requested_width: int | None
    requested_height: int | None
    snapped: bool


def bucket_sizes(scale: float) -> list[tuple[int, int]]:
    return [(round(w * scale), round(h * scale)) for w, h in BASE_BUCKETS]


def parse_aspect(aspect: str) -> float:
    """'16:9' or '1.5' -> width / height."""
    try:
        if ":" in aspect:
            w, h = aspect.split(":", 1)
            ratio = float(w) / float(h)
        else:
            ratio = float(aspect)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"aspect {aspect!r} is not 'W:H' or a positive number") from None
    if not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"aspect {aspect!r} is not a positive ratio")
    return ratio


def choose_size(scales: tuple[float, ...], width: int | None = None, height: int | None = None,
                aspect: str | None = None) -> SizeChoice:
    """Pick the bucket for a request.

    No size: the square bucket at the model's first scale. An aspect only: the bucket with the nearest log aspect
    ratio at the first scale. A width and height: an exact bucket if one matches at any scale; otherwise the nearest
    bucket by log aspect ratio, at the scale whose area is nearest (`snapped=True`).
    """
    if width is None and height is None:
        if aspect is None:
            w, h = bucket_sizes(scales[0])[SQUARE_BUCKET]
            return SizeChoice(w, h, SQUARE_BUCKET, scales[0], None, None, False)
        ratio = parse_aspect(aspect)
        idx = _nearest_ratio(ratio)
        w, h = bucket_sizes(scales[0])[idx]
        exact = abs(math.log(w / h) - math.log(ratio)) < 1e-9
        return SizeChoice(w, h, idx, scales[0], None, None, not exact)
    if width is None or height is None:
        raise ValueError("give both width and height, or neither")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    for scale in scales:
        sizes = bucket_sizes(scale)
        if (width, height) in sizes:
            return SizeChoice(width, height, sizes.index((width, height)), scale, width, height, False)
    idx = _nearest_ratio(width / height)
    area = width * height
    scale = min(scales, key=lambda s: abs(math.log(area / (512 * 512 * s * s))))
    w, h = bucket_sizes(scale)[idx]
    return SizeChoice(w, h, idx, scale, width, height, True)


def _nearest_ratio(ratio: float) -> int:
    target = math.log(ratio)
    return min(range(len(BASE_BUCKETS)), key=lambda i: abs(math.log(BASE_BUCKETS[i][0] / BASE_BUCKETS[i][1]) - target))


def bucket_embedding(bucket: int, dim: int) -> np.ndarray:
    """Sinusoidal embedding of the bucket index: freqs = exp(-ln(10000) k / (dim/2)), [cos, sin] (cos first)."""
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float32) / half)
    args = float(bucket) * freqs
    return np.concatenate([np.cos(args), np.sin(args)]).astype(np.float32)
