"""The rows that travel between pipeline stages: one per image to make (a "unit"), as Arrow blocks of one schema.

Every stage reads and writes the same columns; a stage fills the columns it produces and empties the ones no later
stage needs, so blocks stay small. Arrays (conditioning, latents, pixels) travel as `.npz` bytes: their shapes vary
from row to row (bucket, branch count), which fixed-shape tensor columns cannot hold.
"""
from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import pyarrow as pa

from diffusion.model import Conditioning, GenerationRequest, Handoff
from schemas.manifest import InvalidRow, ManifestRow

# Status of a unit while it moves: `pending` until written; `failed` and `invalid` pass through to the writer.
PENDING, FAILED, INVALID = "pending", "failed", "invalid"
TIMED_STAGES = ("encode", "structure", "fusion", "texture", "decode")

UNIT_SCHEMA = pa.schema([
    pa.field("row_id", pa.string()),
    pa.field("image_index", pa.int32()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    # Attempts including this one (earlier failed attempts are read from the result manifest).
    pa.field("attempts", pa.int32()),
    # Pickled ManifestRow (or InvalidRow for invalid rows): keeps pass-through values with their Python types.
    pa.field("row", pa.binary()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("bucket", pa.int8()),
    pa.field("size_snapped", pa.bool_()),
    # Rows with equal groups can share a sampling batch (size, steps, sampler, branch count).
    pa.field("group", pa.string()),
    pa.field("started_at", pa.string()),
    # Coop-Diffusion rows only: JSON of what is fused (mode, helper, ...), completed by the fusion stage.
    pa.field("fusion", pa.string()),
    *(pa.field(f"{stage}_s", pa.float64()) for stage in TIMED_STAGES),
    pa.field("cond", pa.binary()),
    pa.field("handoff", pa.binary()),
    pa.field("latent", pa.binary()),
    pa.field("pixels", pa.binary()),
])
UNIT_COLUMNS = tuple(UNIT_SCHEMA.names)


def to_table(units: list[dict[str, Any]]) -> pa.Table:
    """Units as an Arrow table of UNIT_SCHEMA (missing columns are null)."""
    return pa.Table.from_pylist([{name: unit.get(name) for name in UNIT_COLUMNS} for unit in units], schema=UNIT_SCHEMA)


def from_table(table: pa.Table) -> list[dict[str, Any]]:
    return table.select(list(UNIT_COLUMNS)).to_pylist()


def dump_row(row: ManifestRow | InvalidRow) -> bytes:
    return pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL)


def load_row(data: bytes) -> ManifestRow | InvalidRow:
    return pickle.loads(data)


def request_for(row: ManifestRow, image_index: int) -> GenerationRequest:
    """The model request of one image of a manifest row (image i uses the row's seed + i)."""
    return GenerationRequest(
        prompt=row.prompt, seed=row.image_seed(image_index), negative_prompt=row.negative_prompt,
        width=row.width, height=row.height, aspect=row.aspect, steps=row.steps, sampler=row.sampler,
        guidance_scale=row.guidance_scale, aesthetic_scale=row.aesthetic_scale, anime_scale=row.anime_scale,
        photography_scale=row.photography_scale,
    )


def pack(arrays: dict[str, np.ndarray]) -> bytes:
    """Arrays as `.npz` bytes (no pickling, so only plain dtypes)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def pack_conditioning(cond: Conditioning) -> bytes:
    return pack({"branches": np.array(cond.branches, dtype=str), "context": cond.context, "y": cond.y})


def unpack_conditioning(data: bytes) -> Conditioning:
    arrays = unpack(data)
    return Conditioning(tuple(str(b) for b in arrays["branches"]), arrays["context"], arrays["y"])


def pack_handoff(handoff: Handoff) -> bytes:
    state = {f"state.{name}": value for name, value in handoff.state.items()}
    return pack({"latent": handoff.latent, "step": np.array(handoff.step, dtype=np.int64), **state})


def unpack_handoff(data: bytes) -> Handoff:
    arrays = unpack(data)
    state = {name.removeprefix("state."): value for name, value in arrays.items() if name.startswith("state.")}
    return Handoff(arrays["latent"], int(arrays["step"]), state)
