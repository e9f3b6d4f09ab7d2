"""Prompt manifest rows: the columns, job-level defaults, row validation and the manifest-level schema check.

A manifest is Parquet with one prompt per row. Only `prompt` is required; every other known column is optional per
row and filled from the job's `GenerationDefaults`. Columns the manifest does not know pass through to the result.
"""
from __future__ import annotations

import hashlib
import math
import numbers
from pathlib import PurePosixPath
from typing import Annotated, Any, Callable, Literal

import pyarrow as pa
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from schemas.errors import UserError
from schemas.keys import safe_key

SAMPLERS = ("euler", "ddim", "euler_ancestral", "dpmpp_2m")
SamplerName = Literal["euler", "ddim", "euler_ancestral", "dpmpp_2m"]
MAX_SEED = 2**63 - 1
MIN_SIDE, MAX_SIDE = 8, 8192
MAX_STEPS = 1000
MAX_IMAGES_PER_ROW = 16
DEFAULT_HELPER_WEIGHT = 0.5

_EXPECTED_TYPE = "expected"
_CROSS_FIELD_TYPE = "cross_field"


def _fail(expected: str) -> None:
    raise PydanticCustomError(_EXPECTED_TYPE, "expected {expected}", {"expected": expected})


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integer_check(lo: int, hi: int, expected: str | None = None) -> Callable[[Any], int]:
    expected = expected or f"an integer {lo}..{hi}"

    def check(value: Any) -> int:
        if not _is_number(value):
            _fail(expected)
        if not isinstance(value, numbers.Integral):
            if not math.isfinite(value) or not float(value).is_integer():
                _fail(expected)
        value = int(value)
        if not lo <= value <= hi:
            _fail(expected)
        return value

    return check


def _number_check(lo: float, hi: float | None, expected: str) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if not _is_number(value):
            _fail(expected)
        value = float(value)
        if not math.isfinite(value) or value < lo or (hi is not None and value > hi):
            _fail(expected)
        return value

    return check


def _text_check(allow_empty: bool) -> Callable[[Any], str]:
    expected = "a string" if allow_empty else "a non-empty string"

    def check(value: Any) -> str:
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            _fail(expected)
        return value

    return check


def _sampler_check(value: Any) -> str:
    if value not in SAMPLERS:
        _fail("one of " + ", ".join(SAMPLERS))
    return value


def parse_ratio(text: str) -> float:
    """'16:9' or '1.5' -> width / height; ValueError when it is not a positive finite ratio."""
    if ":" in text:
        w, h = text.split(":", 1)
        ratio = float(w) / float(h)
        if float(w) <= 0 or float(h) <= 0:
            raise ValueError(text)
    else:
        ratio = float(text)
    if not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(text)
    return ratio


def _aspect_check(value: Any) -> str:
    expected = "'W:H' with positive numbers (e.g. '16:9') or a positive ratio"
    if not isinstance(value, str):
        _fail(expected)
    try:
        parse_ratio(value)
    except (ValueError, ZeroDivisionError):
        _fail(expected)
    return value.strip()


def _window_check(value: Any) -> tuple[float, float]:
    expected = "'start:end' fractions of the sampling steps with 0 <= start < end <= 1 (e.g. '0:0.5')"
    try:
        if isinstance(value, str):
            start, end = (float(part) for part in value.split(":"))
        elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_number(v) for v in value):
            start, end = float(value[0]), float(value[1])
        else:
            raise ValueError(value)
    except ValueError:
        _fail(expected)
    if not (0.0 <= start < end <= 1.0):
        _fail(expected)
    return (start, end)


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else check(value)


# Field types. Each validator raises one error naming what was expected, so messages stay readable.
NonEmptyText = Annotated[str, BeforeValidator(_text_check(allow_empty=False))]
Text = Annotated[str, BeforeValidator(_text_check(allow_empty=True))]
OptionalText = Annotated[str | None, BeforeValidator(_optional(_text_check(allow_empty=False)))]
Steps = Annotated[int, BeforeValidator(_integer_check(1, MAX_STEPS))]
NumImages = Annotated[int, BeforeValidator(_integer_check(1, MAX_IMAGES_PER_ROW))]
Side = Annotated[int | None, BeforeValidator(_optional(_integer_check(MIN_SIDE, MAX_SIDE)))]
Seed = Annotated[int | None, BeforeValidator(_optional(_integer_check(0, MAX_SEED, "an integer 0..2**63-1")))]
Scale = Annotated[float, BeforeValidator(_number_check(0.0, None, "a number >= 0"))]
Weight = Annotated[float | None, BeforeValidator(_optional(_number_check(0.0, 1.0, "a number 0..1")))]
Sampler = Annotated[SamplerName, BeforeValidator(_sampler_check)]
Aspect = Annotated[str | None, BeforeValidator(_optional(_aspect_check))]
Window = Annotated[tuple[float, float] | None, BeforeValidator(_optional(_window_check))]

# What each input column expects, for messages about missing values.
EXPECTED = {
    "row_id": "a non-empty string or an integer",
    "prompt": "a non-empty string",
}


class GenerationDefaults(BaseModel):
    """Job-level values for every generation column a row leaves out (the reference defaults of PanGu-Draw v3)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    negative_prompt: Text = ""
    steps: Steps = 40
    sampler: Sampler = "euler"
    guidance_scale: Scale = 6.0
    aesthetic_scale: Scale = 4.0
    anime_scale: Scale = 0.0
    photography_scale: Scale = 0.0
    # None: the model's square bucket.
    width: Side = None
    height: Side = None
    num_images: NumImages = 1

    @model_validator(mode="after")
    def _check_size(self) -> "GenerationDefaults":
        if (self.width is None) != (self.height is None):
            raise ValueError("give both width and height, or neither")
        return self


_D = GenerationDefaults()


class ManifestRow(BaseModel):
    """One validated manifest row with job defaults filled in.

    `helper_window` is a fraction of the row's sampling steps: step i of N (0-based) joins the helper model when
    start <= i / N < end; None with a helper model means (0, 1), every step.
    """

    model_config = ConfigDict(extra="forbid")

    row_id: NonEmptyText
    prompt: NonEmptyText
    negative_prompt: Text = _D.negative_prompt
    seed: Seed = None
    # True when the manifest gave no seed and it was derived from row_id (`derive_seed`).
    seed_derived: bool = False
    width: Side = None
    height: Side = None
    aspect: Aspect = None
    steps: Steps = _D.steps
    sampler: Sampler = _D.sampler
    guidance_scale: Scale = _D.guidance_scale
    aesthetic_scale: Scale = _D.aesthetic_scale
    anime_scale: Scale = _D.anime_scale
    photography_scale: Scale = _D.photography_scale
    num_images: NumImages = _D.num_images
    # Coop-Diffusion (SPEC section 8), used by the fusion stage.
    helper_model: OptionalText = None
    helper_weight: Weight = None
    helper_window: Window = None
    control_image_uri: OptionalText = None
    # Super-resolution target of a resolution-gap fusion.
    output_width: Side = None
    output_height: Side = None
    # Position of the row in its manifest file (0-based).
    row_index: int | None = None
    # Columns the manifest does not know, passed through to the result unchanged.
    passthrough: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _cross_field(self) -> "ManifestRow":
        problems = []
        for first, second in (("width", "height"), ("output_width", "output_height")):
            a, b = getattr(self, first), getattr(self, second)
            if (a is None) != (b is None):
                missing = second if b is None else first
                problems.append(f"field '{missing}': expected together with '{first if b is None else second}', got nothing")
        if self.aspect is not None and self.width is not None:
            problems.append("field 'aspect': expected either width/height or aspect, not both")
        if self.output_width is not None and self.width is not None and self.output_height is not None \
                and self.height is not None:
            if self.output_width < self.width or self.output_height < self.height:
                problems.append(
                    f"field 'output_width': expected an output size of at least the generation size "
                    f"{self.width}x{self.height}, got {self.output_width}x{self.output_height}"
                )
        if self.helper_model is None:
            for name in ("helper_weight", "helper_window", "control_image_uri"):
                if getattr(self, name) is not None:
                    problems.append(f"field '{name}': expected only together with helper_model, which is empty")
        if problems:
            raise PydanticCustomError(_CROSS_FIELD_TYPE, "{detail}", {"detail": "; ".join(problems)})
        if self.helper_model is not None:
            if self.helper_weight is None:
                self.helper_weight = DEFAULT_HELPER_WEIGHT
            if self.helper_window is None:
                self.helper_window = (0.0, 1.0)
        if self.seed is None:
            self.seed = derive_seed(self.row_id)
            self.seed_derived = True
        return self

    @property
    def aspect_ratio(self) -> float | None:
        """Requested width / height from `aspect`, or None."""
        return None if self.aspect is None else parse_ratio(self.aspect)

    @property
    def key(self) -> str:
        """Object-key stem of this row (`schemas.keys.safe_key`)."""
        return safe_key(self.row_id)

    def image_seed(self, image_index: int) -> int:
        """Seed of the row's image `image_index`: consecutive seeds, so image 0 uses the row's seed."""
        if not 0 <= image_index < self.num_images:
            raise ValueError(f"image_index {image_index} outside 0..{self.num_images - 1}")
        return (self.seed + image_index) % (MAX_SEED + 1)

    def helper_window_text(self) -> str | None:
        return None if self.helper_window is None else f"{self.helper_window[0]:g}:{self.helper_window[1]:g}"


class InvalidRow(BaseModel):
    """A row that cannot be generated, with a message naming the row, the field and what was expected."""

    row_id: str
    row_index: int
    source: str
    message: str
    prompt: str | None = None
    passthrough: dict[str, Any] = Field(default_factory=dict)


# Input columns the manifest knows; everything else passes through.
INPUT_COLUMNS = (
    "row_id", "prompt", "negative_prompt", "seed", "width", "height", "aspect", "steps", "sampler",
    "guidance_scale", "aesthetic_scale", "anime_scale", "photography_scale", "num_images",
    "helper_model", "helper_weight", "helper_window", "control_image_uri", "output_width", "output_height",
)
_SIZE_COLUMNS = ("width", "height", "aspect")


def derive_seed(row_id: str) -> int:
    """Seed of a row without one: the first 8 bytes of sha256(row_id), big-endian, masked to 63 bits."""
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


def derive_row_id(source: str, index: int) -> str:
    """Stable id of a row without one: `<file-stem>-<index:08d>`, the stem of the last path component of `source`.

    Two manifest files with the same name in different folders give the same ids; the duplicates are then reported.
    """
    name = PurePosixPath(source.rstrip("/").replace("\\", "/")).name
    stem = name[: -len(".parquet")] if name.endswith(".parquet") else PurePosixPath(name).stem
    return f"{stem or 'row'}-{index:08d}"


def _is_missing(value: Any) -> bool:
    # A nullable Parquet column gives None; pandas writes a missing float as NaN.
    return value is None or (isinstance(value, float) and math.isnan(value))


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        if error["type"] == _CROSS_FIELD_TYPE:
            parts.append(error["msg"])
            continue
        field = str(error["loc"][0]) if error["loc"] else "?"
        if error["type"] == _EXPECTED_TYPE:
            expected = error["ctx"]["expected"]
        else:
            expected = EXPECTED.get(field, error["msg"])
        got = "nothing" if error["type"] == "missing" else _short_repr(error.get("input"))
        parts.append(f"field '{field}': expected {expected}, got {got}")
    return "; ".join(parts)


def validate_rows(
    records: list[dict[str, Any]],
    *,
    defaults: GenerationDefaults,
    source: str,
    start_index: int = 0,
    seen_ids: dict[str, int] | None = None,
) -> tuple[list[ManifestRow], list[InvalidRow]]:
    """Validate manifest records (dicts from `Table.to_pylist()`) and fill job defaults.

    `start_index` is the position of `records[0]` in its file. A null (or NaN) value counts as not given. A row
    giving any of width/height/aspect replaces the default size. Pass the same `seen_ids` (id -> first row index)
    across calls to find duplicate ids across batches and files; the later rows of an id are invalid.
    """
    seen = {} if seen_ids is None else seen_ids
    valid: list[ManifestRow] = []
    invalid: list[InvalidRow] = []
    default_values = defaults.model_dump()
    for offset, record in enumerate(records):
        index = start_index + offset
        given = {k: v for k, v in record.items() if k in INPUT_COLUMNS and not _is_missing(v)}
        passthrough = {k: v for k, v in record.items() if k not in INPUT_COLUMNS}
        row_id = given.get("row_id", derive_row_id(source, index))
        if isinstance(row_id, numbers.Integral) and not isinstance(row_id, bool):
            row_id = str(int(row_id))
        shown_id = row_id if isinstance(row_id, str) and row_id.strip() else derive_row_id(source, index)

        values = dict(default_values)
        if any(name in given for name in _SIZE_COLUMNS):
            values.pop("width"), values.pop("height")
        values.update(given)
        values.update(row_id=row_id, row_index=index, passthrough=passthrough)

        def reject(message: str) -> None:
            prompt = record.get("prompt")
            invalid.append(InvalidRow(
                row_id=shown_id, row_index=index, source=source, message=f"row {index} (id {shown_id!r}): {message}",
                prompt=prompt if isinstance(prompt, str) else None, passthrough=passthrough,
            ))

        first = seen.get(shown_id)
        if first is not None:
            reject(f"field 'row_id': expected a unique id, got {_short_repr(shown_id)} again (first used by row {first})")
            continue
        seen[shown_id] = index
        try:
            valid.append(ManifestRow.model_validate(values))
        except ValidationError as exc:
            reject(_describe(exc))
    return valid, invalid


# ---------------------------------------------------------------- manifest-level checks

def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_number_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


_STRING_COLUMNS = ("prompt", "negative_prompt", "sampler", "aspect", "helper_model", "helper_window",
                   "control_image_uri")
_NUMBER_COLUMNS = ("steps", "num_images", "width", "height", "output_width", "output_height",
                   "guidance_scale", "aesthetic_scale", "anime_scale", "photography_scale", "helper_weight")


def check_manifest_schema(arrow_schema: pa.Schema, source: str) -> None:
    """Raise UserError when a manifest cannot be used at all: no `prompt` column, or a known column of a wrong type."""
    names = arrow_schema.names
    if "prompt" not in names:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise UserError(
            f"manifest {source} has no 'prompt' column (it has: {shown or 'no columns'}); "
            "add a string column named 'prompt' with one prompt per row"
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"manifest {source} has duplicate columns {duplicates}; give each column a unique name")
    problems = []
    for field in arrow_schema:
        t, name = field.type, field.name
        if name == "prompt":
            ok = _is_string(t)
            want = "a string column"
        elif name not in INPUT_COLUMNS or pa.types.is_null(t):
            continue  # pass-through columns keep any type; an all-null column means "not given"
        elif name in _STRING_COLUMNS:
            ok, want = _is_string(t), "a string column"
        elif name == "row_id":
            ok, want = _is_string(t) or pa.types.is_integer(t), "a string or integer column"
        elif name == "seed":
            # A float column cannot hold 63-bit seeds exactly.
            ok, want = pa.types.is_integer(t), "an integer column (int64; use a nullable integer type for gaps)"
        elif name in _NUMBER_COLUMNS:
            ok, want = _is_number_type(t), "a numeric column"
        else:
            continue
        if not ok:
            problems.append(f"column '{name}' is {t}, expected {want}")
    if problems:
        raise UserError(f"manifest {source}: " + "; ".join(problems) + "; fix the column types and run again")


def passthrough_fields(arrow_schema: pa.Schema) -> pa.Schema:
    """The manifest columns that pass through to the result unchanged, in manifest order."""
    return pa.schema([f for f in arrow_schema if f.name not in INPUT_COLUMNS])
