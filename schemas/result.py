"""Result rows (one per image, or one per invalid row), their Arrow schema, and the job summary (`_SUCCESS.json`)."""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any, Iterable, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.manifest import InvalidRow, ManifestRow

Status = Literal["ok", "invalid", "failed"]
STAGES = ("encode", "structure", "fusion", "texture", "decode", "write")
# Pass-through columns whose names clash with a result column get this prefix in the result.
PASSTHROUGH_CLASH_PREFIX = "manifest_"


def utc_now() -> str:
    """Current time as ISO 8601 UTC with milliseconds, e.g. 2026-01-02T03:04:05.678Z."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ResultRow(BaseModel):
    """What was made for one image of one manifest row, how and where; or why nothing was made."""

    model_config = ConfigDict(extra="forbid")

    row_id: str
    image_index: int = Field(0, ge=0)
    status: Status
    error: str | None = None
    image_uri: str | None = None
    # Key under the output root (`images/<safe key>.<ext>`); differs from the row id when that is not a safe key.
    image_key: str | None = None
    width: int | None = None
    height: int | None = None
    bucket: int | None = Field(None, ge=0, le=10)
    seed: int | None = None
    seed_derived: bool | None = None
    # Generation parameters actually used.
    prompt: str | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    sampler: str | None = None
    guidance_scale: float | None = None
    aesthetic_scale: float | None = None
    anime_scale: float | None = None
    photography_scale: float | None = None
    num_images: int | None = None
    requested_width: int | None = None
    requested_height: int | None = None
    requested_aspect: str | None = None
    size_snapped: bool | None = None
    helper_model: str | None = None
    helper_weight: float | None = None
    helper_window: str | None = None
    control_image_uri: str | None = None
    output_width: int | None = None
    output_height: int | None = None
    # Model identities: name and a hash of the weights.
    model_name: str | None = None
    model_hash: str | None = None
    # The encoded image.
    sha256: str | None = None
    bytes: int | None = Field(None, ge=0)
    encode_s: float | None = None
    structure_s: float | None = None
    fusion_s: float | None = None
    texture_s: float | None = None
    decode_s: float | None = None
    write_s: float | None = None
    attempts: int = Field(1, ge=0)
    started_at: str | None = None
    finished_at: str | None = None
    # Coop-Diffusion rows: JSON of what was fused (mode, helper model and its directory name, weight, window,
    # control image URI, bridge or super-resolution sizes; `actors.fusion`); None for plain rows.
    fusion: str | None = None
    passthrough: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_status(self) -> "ResultRow":
        if self.status == "ok" and not self.image_uri:
            raise ValueError("an ok result needs image_uri")
        if self.status != "ok" and not self.error:
            raise ValueError(f"a {self.status} result needs an error message")
        return self

    @classmethod
    def from_row(cls, row: ManifestRow, *, image_index: int = 0, **fields: Any) -> "ResultRow":
        """A result carrying the row's parameters and pass-through columns; `fields` add or override the rest
        (status, image_uri, width, height, bucket, size_snapped, timings, ...)."""
        values: dict[str, Any] = dict(
            row_id=row.row_id, image_index=image_index, seed=row.image_seed(image_index),
            seed_derived=row.seed_derived, prompt=row.prompt, negative_prompt=row.negative_prompt,
            steps=row.steps, sampler=row.sampler, guidance_scale=row.guidance_scale,
            aesthetic_scale=row.aesthetic_scale, anime_scale=row.anime_scale,
            photography_scale=row.photography_scale, num_images=row.num_images,
            requested_width=row.width, requested_height=row.height, requested_aspect=row.aspect,
            helper_model=row.helper_model, helper_weight=row.helper_weight,
            helper_window=row.helper_window_text(), control_image_uri=row.control_image_uri,
            output_width=row.output_width, output_height=row.output_height,
            passthrough=dict(row.passthrough),
        )
        values.update(fields)
        return cls(**values)

    @classmethod
    def from_invalid(cls, row: InvalidRow, **fields: Any) -> "ResultRow":
        """The result of a row that failed validation (status `invalid`, attempts 0)."""
        values: dict[str, Any] = dict(
            row_id=row.row_id, status="invalid", error=row.message, prompt=row.prompt, attempts=0,
            passthrough=dict(row.passthrough),
        )
        values.update(fields)
        return cls(**values)


# Arrow type of every fixed result column, in the order of the shards.
_ARROW_TYPES: dict[str, pa.DataType] = {
    "row_id": pa.string(), "image_index": pa.int32(), "status": pa.string(), "error": pa.string(),
    "image_uri": pa.string(), "image_key": pa.string(), "width": pa.int32(), "height": pa.int32(),
    "bucket": pa.int8(), "seed": pa.int64(), "seed_derived": pa.bool_(),
    "prompt": pa.string(), "negative_prompt": pa.string(), "steps": pa.int32(), "sampler": pa.string(),
    "guidance_scale": pa.float64(), "aesthetic_scale": pa.float64(), "anime_scale": pa.float64(),
    "photography_scale": pa.float64(), "num_images": pa.int32(),
    "requested_width": pa.int32(), "requested_height": pa.int32(), "requested_aspect": pa.string(),
    "size_snapped": pa.bool_(), "helper_model": pa.string(), "helper_weight": pa.float64(),
    "helper_window": pa.string(), "control_image_uri": pa.string(), "output_width": pa.int32(),
    "output_height": pa.int32(), "model_name": pa.string(), "model_hash": pa.string(),
    "sha256": pa.string(), "bytes": pa.int64(),
    "encode_s": pa.float64(), "structure_s": pa.float64(), "fusion_s": pa.float64(), "texture_s": pa.float64(),
    "decode_s": pa.float64(), "write_s": pa.float64(), "attempts": pa.int32(),
    "started_at": pa.string(), "finished_at": pa.string(), "fusion": pa.string(),
}
RESULT_COLUMNS = tuple(_ARROW_TYPES)


def result_column_name(passthrough_name: str) -> str:
    """Column name of a pass-through column in the result (prefixed when it clashes with a result column)."""
    if passthrough_name in _ARROW_TYPES or passthrough_name.startswith(PASSTHROUGH_CLASH_PREFIX):
        return PASSTHROUGH_CLASH_PREFIX + passthrough_name
    return passthrough_name


def result_schema(passthrough: pa.Schema | None = None) -> pa.Schema:
    """Schema of result shards: the fixed columns in a stable order, then the pass-through columns.

    Give the manifest's pass-through fields (`schemas.manifest.passthrough_fields`) so every shard of a job has the
    same schema; a pass-through column keeps its manifest type.
    """
    fields = [pa.field(name, t) for name, t in _ARROW_TYPES.items()]
    for f in passthrough or []:
        fields.append(pa.field(result_column_name(f.name), f.type))
    return pa.schema(fields)


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def _inferred_passthrough(rows: list[ResultRow]) -> pa.Schema:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row.passthrough))
    fields = []
    for name in names:
        values = [row.passthrough.get(name) for row in rows]
        try:
            t = pa.array(values).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            t = pa.string()
        fields.append(pa.field(name, pa.string() if pa.types.is_null(t) else t))
    return pa.schema(fields)


def results_to_table(rows: Iterable[ResultRow], passthrough: pa.Schema | None = None) -> pa.Table:
    """Result rows as an Arrow table of `result_schema(passthrough)`.

    Without `passthrough` the pass-through types are inferred from these rows (all-null or mixed columns become
    strings); pass the manifest's fields instead when shards must share one schema.
    """
    rows = list(rows)
    if passthrough is None:
        passthrough = _inferred_passthrough(rows)
    schema = result_schema(passthrough)
    columns = []
    for name, t in _ARROW_TYPES.items():
        columns.append(pa.array([getattr(row, name) for row in rows], type=t))
    for f in passthrough:
        values = [row.passthrough.get(f.name) for row in rows]
        try:
            columns.append(pa.array(values, type=f.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            if not pa.types.is_string(f.type):
                raise
            columns.append(pa.array([_as_text(v) for v in values], type=pa.string()))
    return pa.Table.from_arrays(columns, schema=schema)


def results_from_table(table: pa.Table) -> list[ResultRow]:
    """Read result rows back from a shard (every column that is not a result column is a pass-through one)."""
    rows = []
    for record in table.to_pylist():
        fixed = {k: record[k] for k in _ARROW_TYPES if k in record}
        # Every result column with the prefix is a renamed pass-through column (see `result_column_name`).
        extra = {k.removeprefix(PASSTHROUGH_CLASH_PREFIX): v for k, v in record.items() if k not in _ARROW_TYPES}
        rows.append(ResultRow(**fixed, passthrough=extra))
    return rows


class JobSummary(BaseModel):
    """`_SUCCESS.json`: written last; counts are of result rows (one per image; an invalid row counts once)."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    output_uri: str
    total: int = Field(ge=0)
    ok: int = Field(ge=0)
    invalid: int = Field(ge=0)
    failed: int = Field(ge=0)
    # Results already ok from an earlier run of the same job, not generated again.
    skipped_existing: int = Field(0, ge=0)
    started_at: str
    finished_at: str
    wall_s: float = Field(ge=0)
    images_per_s: float = Field(ge=0)
    # Seconds summed over the images of this run, and the mean per image, for each stage.
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    stage_seconds_per_image: dict[str, float] = Field(default_factory=dict)
    actors_per_stage: dict[str, int] = Field(default_factory=dict)
    # Achieved / ceiling images per second (ceiling = devices / device-seconds per image), when known.
    expected_efficiency: float | None = None
    efficiency: float | None = None
    model_name: str | None = None
    model_hash: str | None = None

    @model_validator(mode="after")
    def _check_counts(self) -> "JobSummary":
        if self.total != self.ok + self.invalid + self.failed + self.skipped_existing:
            raise ValueError(
                f"total {self.total} != ok {self.ok} + invalid {self.invalid} + failed {self.failed} "
                f"+ skipped_existing {self.skipped_existing}"
            )
        for name, value in {**self.stage_seconds, **self.stage_seconds_per_image}.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"stage seconds of {name!r} must be a finite number >= 0, got {value}")
        return self
