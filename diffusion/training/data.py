"""Training data: Parquet rows of image bytes and captions, sorted into aspect buckets, plus the batch order.

A row needs an image column (`image`: encoded PNG/JPEG/WebP bytes) and one or more caption columns (by default
every one of `caption_en`, `caption_zh`, `caption_mixed`, `caption`, `text`, `prompt` that the table has; a
training sample draws one of its row's captions at random, so a row with an English and a Chinese caption teaches
both). Reading a URI (file or S3) is the caller's business: pass `pyarrow.Table`s or Parquet bytes.

Each image is assigned to the model's nearest aspect bucket. An image with less than `low_resolution_area` of its
bucket's pixels counts as low-resolution: the structure generator uses it upsampled, the texture and monolithic
trainers leave it out (SPEC section 7).
"""
from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from diffusion import buckets
from schemas.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_CAPTION_COLUMNS = ("caption_en", "caption_zh", "caption_mixed", "caption", "text", "prompt")
IMAGE_COLUMNS = ("image", "image_bytes", "png", "jpg")


def read_tables(sources: Iterable[pa.Table | bytes]) -> pa.Table:
    """Concatenate Parquet sources (tables or file bytes) into one table."""
    tables = []
    for src in sources:
        if isinstance(src, (bytes, bytearray, memoryview)):
            src = pq.read_table(pa.BufferReader(bytes(src)))
        tables.append(src)
    if not tables:
        raise UserError("no training data: no Parquet files were given")
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


@dataclass
class ImageTextSet:
    """Decoded images (uint8 H x W x 3) and, per image, the captions it may be trained with."""

    images: list[np.ndarray]
    captions: list[tuple[str, ...]]

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_table(cls, table: pa.Table, caption_columns: Sequence[str] | None = None) -> "ImageTextSet":
        image_col = next((c for c in IMAGE_COLUMNS if c in table.column_names), None)
        if image_col is None:
            raise UserError(f"training data has no image column; expected one of {IMAGE_COLUMNS}, "
                            f"got {table.column_names}")
        wanted = list(caption_columns) if caption_columns else [c for c in DEFAULT_CAPTION_COLUMNS
                                                                  if c in table.column_names]
        missing = [c for c in wanted if c not in table.column_names]
        if missing or not wanted:
            raise UserError(f"training data lacks caption column(s) {missing or list(DEFAULT_CAPTION_COLUMNS)}; "
                            f"it has {table.column_names}")
        columns = [table.column(c).to_pylist() for c in wanted]
        images, captions = [], []
        for i, data in enumerate(table.column(image_col).to_pylist()):
            if data is None:
                raise UserError(f"training data row {i}: the {image_col!r} column is empty")
            try:
                with Image.open(io.BytesIO(data)) as im:
                    images.append(np.asarray(im.convert("RGB")))
            except OSError as exc:
                raise UserError(f"training data row {i}: the image does not decode ({exc})") from None
            texts = tuple(str(col[i]) for col in columns if col[i])
            if not texts:
                raise UserError(f"training data row {i}: every caption column is empty")
            captions.append(texts)
        return cls(images, captions)


@dataclass
class BucketedImages:
    """Images resized to their buckets' sizes, grouped by bucket; `source` maps back to rows of the set."""

    sizes: dict[int, tuple[int, int]]  # bucket -> (width, height)
    images: dict[int, np.ndarray]  # bucket -> (N, H, W, 3) uint8
    source: dict[int, np.ndarray]  # bucket -> (N,) row indices
    low_resolution: dict[int, np.ndarray]  # bucket -> (N,) bool
    rows_total: int
    rows_used: int = field(default=0)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.source.values())


def bucket_images(data: ImageTextSet, bucket_scale: float, *, use_low_resolution: bool,
                  low_resolution_area: float = 0.6) -> BucketedImages:
    """Assign every image to its nearest bucket at `bucket_scale` and resize it there.

    An image whose area is below `low_resolution_area` of its bucket's is upsampled (bicubic) when
    `use_low_resolution`, else skipped. An image of another aspect ratio is centre-cropped to the bucket's ratio.
    """
    sizes, images, source, low = {}, {}, {}, {}
    for i, img in enumerate(data.images):
        h, w = img.shape[:2]
        choice = buckets.choose_size((bucket_scale,), width=w, height=h)
        bw, bh = choice.width, choice.height
        is_low = w * h < low_resolution_area * bw * bh
        if is_low and not use_low_resolution:
            continue
        sizes[choice.bucket] = (bw, bh)
        images.setdefault(choice.bucket, []).append(fit_to_size(img, bw, bh))
        source.setdefault(choice.bucket, []).append(i)
        low.setdefault(choice.bucket, []).append(is_low)
    out = BucketedImages(
        sizes=sizes,
        images={b: np.stack(v) for b, v in images.items()},
        source={b: np.asarray(v, dtype=np.int64) for b, v in source.items()},
        low_resolution={b: np.asarray(v, dtype=bool) for b, v in low.items()},
        rows_total=len(data),
    )
    out.rows_used = out.count
    if not out.count:
        raise UserError("no training images left: every image is low-resolution and this trainer does not use them")
    log.info("bucketed %d of %d images: %s", out.count, len(data),
             {f"{sizes[b][0]}x{sizes[b][1]}": len(v) for b, v in source.items()})
    return out


def fit_to_size(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Centre-crop to the target aspect ratio, then resize (bicubic) to width x height; unchanged if equal."""
    h, w = img.shape[:2]
    if (w, h) == (width, height):
        return img
    target = width / height
    if abs(w / h - target) > 1e-6:
        if w / h > target:
            new_w = max(1, round(h * target))
            left = (w - new_w) // 2
            img = img[:, left:left + new_w]
        else:
            new_h = max(1, round(w / target))
            top = (h - new_h) // 2
            img = img[top:top + new_h]
    return np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.BICUBIC))


class BatchOrder:
    """Which samples form micro-batch k: a deterministic function of (seed, k), so a resumed run continues exactly.

    Each epoch shuffles every group's samples, cuts them into full batches (a group is one bucket, so a batch has
    one shape; the remainder waits for the next epoch's shuffle) and shuffles the batches.
    """

    def __init__(self, groups: dict[int, np.ndarray], batch_size: int, seed: int):
        self.groups = {k: np.asarray(v) for k, v in sorted(groups.items())}
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = sum(len(v) // batch_size for v in self.groups.values())
        if self.batches_per_epoch == 0:
            raise UserError(f"batch size {batch_size} is larger than every bucket's sample count "
                            f"{ {k: len(v) for k, v in self.groups.items()} }")
        self._epoch_cache: tuple[int, list[tuple[int, np.ndarray]]] | None = None

    def _epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch, 0xBA7C4])))
        batches = []
        for key, members in self.groups.items():
            perm = members[rng.permutation(len(members))]
            for start in range(0, len(perm) - self.batch_size + 1, self.batch_size):
                batches.append((key, perm[start:start + self.batch_size]))
        order = rng.permutation(len(batches))
        result = [batches[i] for i in order]
        self._epoch_cache = (epoch, result)
        return result

    def batch(self, micro_step: int) -> tuple[int, np.ndarray]:
        """(group key, sample indices) of micro-batch `micro_step` (0-based, counting across epochs)."""
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        return self._epoch(epoch)[position]


def step_rng(seed: int, micro_step: int, stream: int = 0) -> np.random.Generator:
    """The random numbers of one micro-step (noise, timesteps, captions, crops): a function of (seed, step) only."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, micro_step, stream, 0x5EED])))
