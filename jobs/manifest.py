"""Manifests: find the Parquet files, check them before any generation, read them as a stream, validate rows.

`open_manifest` does every check that can stop a job (no file, unreadable file, no `prompt` column, wrong column
types, files whose columns disagree) from the Parquet footers and the `row_id` column alone, finds duplicate
row ids across all files, and lists the helper models that Coop-Diffusion rows name (`helper_model`).
`ManifestDatasource` then streams the rows through Ray Data, each row tagged with its file and position (a row
without an id gets a stable one from both), and `ValidateStage` turns rows into units: one per image to make, or
one `invalid` unit with the reason.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from actors.fusion import HelperModel, check_helper_model, plan_fused_row
from actors.rows import INVALID, PENDING, dump_row, request_for, to_table
from diffusion.config import ModelConfig
from schemas.errors import UserError
from schemas.job import S3Settings
from schemas.manifest import (
    MAX_IMAGES_PER_ROW, GenerationDefaults, InvalidRow, ManifestRow, check_manifest_schema, derive_row_id, passthrough_fields,
    validate_rows,
)
from schemas.result import utc_now

log = logging.getLogger(__name__)

SOURCE_COLUMN = "__source"
INDEX_COLUMN = "__row_index"


@dataclass(frozen=True)
class ManifestFile:
    """One Parquet file of a manifest: its URI (the row's `source`), its path in the filesystem, its row groups."""

    source: str
    path: str
    row_group_rows: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)


@dataclass
class Manifest:
    """A checked manifest: its files, one schema for all of them, and what the id scan found."""

    uri: str
    files: list[ManifestFile]
    filesystem: pafs.FileSystem
    schema: pa.Schema
    total_rows: int
    # Images the manifest asks for (num_images per row, the job default where a row gives none).
    total_units: int
    # Of those, the ones without an ok result yet (invalid rows count: they are checked again).
    pending_units: int = 0
    # (source, row index) of each later row of a repeated id -> (the id, row index of its first use).
    duplicates: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    # Every `helper_model` value the rows name (Coop-Diffusion), and per value the images without an ok result.
    helper_models: set[str] = field(default_factory=set)
    fused_pending_by_helper: dict[str, int] = field(default_factory=dict)

    @property
    def fused_pending(self) -> int:
        return sum(self.fused_pending_by_helper.values())

    @property
    def passthrough(self) -> pa.Schema:
        return passthrough_fields(self.schema)


# ---------------------------------------------------------------- finding and checking files

def _uri_of(store_root_uri: str, fs: pafs.FileSystem, root_path: str, path: str) -> str:
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    rel = path[len(root_path):].lstrip("/")
    return f"{store_root_uri}/{rel}" if rel else store_root_uri


def _find_files(uri: str, s3: S3Settings | None) -> tuple[pafs.FileSystem, list[tuple[str, str]]]:
    from storage import open_store

    store = open_store(uri, s3)
    fs, root = store.arrow_filesystem()
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            return fs, [(uri if not isinstance(fs, pafs.LocalFileSystem) else root, root)]
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"manifest {uri} does not exist: give a Parquet file or a folder (prefix) of Parquet files")
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as exc:
        raise UserError(f"manifest {uri} cannot be read: {exc}") from None
    paths = sorted(
        i.path for i in infos
        if i.type == pafs.FileType.File and i.path.endswith(".parquet")
        and not any(part.startswith((".", "_")) for part in i.path[len(root):].split("/"))
    )
    if not paths:
        raise UserError(f"manifest prefix {uri} holds no .parquet files")
    return fs, [(_uri_of(store.root_uri, fs, root, p), p) for p in paths]


def _footer(fs: pafs.FileSystem, source: str, path: str) -> pq.FileMetaData:
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"manifest file {source} cannot be read as Parquet ({exc}); "
                        "write the manifest with pyarrow or pandas (`DataFrame.to_parquet`)") from None


def open_manifest(uri: str, s3: S3Settings | None = None, defaults: GenerationDefaults | None = None,
                  done: set[tuple[str, int]] | None = None) -> Manifest:
    """Find and check a manifest (one Parquet file or a prefix); UserError says what to fix when it is unusable.

    `done` holds the (row_id, image_index) already ok, to count what is left to make.
    """
    defaults = defaults or GenerationDefaults()
    fs, found = _find_files(str(uri), s3)
    files, schemas = [], []
    for source, path in found:
        meta = _footer(fs, source, path)
        schema = meta.schema.to_arrow_schema()
        check_manifest_schema(schema, source)
        schemas.append(schema.remove_metadata())
        files.append(ManifestFile(source, path, tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))))
    try:
        schema = pa.unify_schemas(schemas)
    except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
        raise UserError(f"manifest {uri}: its files disagree on column types ({exc}); "
                        "give each column one type in every file") from None
    manifest = Manifest(str(uri), files, fs, schema, sum(f.num_rows for f in files), 0)
    _scan_ids(manifest, defaults, done or set())
    log.info("manifest %s: %d file(s), %d rows, %d images asked for (%d with Coop-Diffusion still to make), "
             "%d repeated row ids", uri, len(files), manifest.total_rows, manifest.total_units,
             manifest.fused_pending, len(manifest.duplicates))
    return manifest


def _scan_ids(manifest: Manifest, defaults: GenerationDefaults, done: set[tuple[str, int]]) -> None:
    """Find repeated row ids across all files (ids as validation will see them), count the images asked for and
    collect the helper models named."""
    columns = [c for c in ("row_id", "num_images", "helper_model") if c in manifest.schema.names]
    ids, file_nos, indices = [], [], []
    units = pending = 0
    fused: dict[str, int] = {}
    for file_no, mf in enumerate(manifest.files):
        table = _read_columns(manifest.filesystem, mf, columns)
        n = table.num_rows
        derived = pa.array([derive_row_id(mf.source, i) for i in range(n)], pa.string())
        if "row_id" in table.column_names:
            given = pc.cast(table["row_id"], pa.string()).combine_chunks()
            blank = pc.or_kleene(pc.is_null(given), pc.equal(pc.utf8_trim_whitespace(given), ""))
            file_ids = pc.if_else(pc.fill_null(blank, True), derived, given)
        else:
            file_ids = derived
        ids.append(file_ids)
        file_nos.append(pa.array([file_no] * n, pa.int32()))
        indices.append(pa.array(range(n), pa.int64()))
        counts = _units_per_row(table, defaults)
        helpers = table["helper_model"].to_pylist() if "helper_model" in table.column_names else [None] * n
        units += sum(counts)
        for row_id, count, helper in zip(file_ids.to_pylist(), counts, helpers):
            left = sum(1 for i in range(count) if (row_id, i) not in done)
            pending += left
            if isinstance(helper, str) and helper.strip():
                fused[helper] = fused.get(helper, 0) + left
                manifest.helper_models.add(helper)
    manifest.total_units = units
    manifest.pending_units = pending
    manifest.fused_pending_by_helper = {helper: n for helper, n in fused.items() if n}
    if not ids:
        return
    table = pa.table({"id": pa.concat_arrays(ids), "file": pa.concat_arrays(file_nos),
                      "index": pa.concat_arrays(indices)})
    counts = table.group_by("id").aggregate([("id", "count")])
    repeated = counts.filter(pc.greater(counts["id_count"], 1))["id"]
    if len(repeated) == 0:
        return
    rows = table.filter(pc.is_in(table["id"], value_set=repeated)).sort_by(
        [("id", "ascending"), ("file", "ascending"), ("index", "ascending")]).to_pylist()
    first: dict[str, int] = {}
    for row in rows:
        if row["id"] in first:
            source = manifest.files[row["file"]].source
            manifest.duplicates[(source, row["index"])] = (row["id"], first[row["id"]])
        else:
            first[row["id"]] = row["index"]


def _read_columns(fs: pafs.FileSystem, mf: ManifestFile, columns: list[str]) -> pa.Table:
    try:
        with fs.open_input_file(mf.path) as f:
            if columns:
                return pq.ParquetFile(f).read(columns=columns)
            return pa.table({"_": pa.nulls(mf.num_rows)})
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"manifest file {mf.source} cannot be read ({exc})") from None


def _units_per_row(table: pa.Table, defaults: GenerationDefaults) -> list[int]:
    """Images each row asks for; a row with an unusable count will be one invalid result."""
    if "num_images" not in table.column_names:
        return [defaults.num_images] * table.num_rows
    counts = []
    for value in table["num_images"].to_pylist():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            counts.append(defaults.num_images)
        else:
            counts.append(int(value) if float(value).is_integer() and 1 <= value <= MAX_IMAGES_PER_ROW else 1)
    return counts


# ---------------------------------------------------------------- streaming read

def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with every column of the manifest's unified schema, in its order (absent columns are null)."""
    columns = []
    for f in schema:
        if f.name in table.column_names:
            column = table[f.name]
            columns.append(column if column.type == f.type else column.cast(f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _read_row_group(fs: pafs.FileSystem, mf: ManifestFile, group: int, start: int, schema: pa.Schema,
                    block_rows: int) -> Iterator[pa.Table]:
    index = start
    with fs.open_input_file(mf.path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=block_rows, row_groups=[group]):
            table = _conform(pa.Table.from_batches([batch]), schema)
            n = table.num_rows
            table = table.append_column(SOURCE_COLUMN, pa.array([mf.source] * n, pa.string()))
            table = table.append_column(INDEX_COLUMN, pa.array(range(index, index + n), pa.int64()))
            index += n
            yield table


def manifest_datasource(manifest: Manifest, block_rows: int):
    """A Ray Data datasource with one read task per row group, yielding blocks of `block_rows` rows.

    Small blocks let the stages after the read overlap from the first rows on. Each row carries its file
    (`__source`) and position in it (`__row_index`), which Ray's own Parquet reader does not give.
    """
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ManifestDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_name(self) -> str:
            return "ReadManifest"

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            tasks = []
            fs, schema = manifest.filesystem, manifest.schema
            for mf in manifest.files:
                start = 0
                for group, rows in enumerate(mf.row_group_rows):
                    if rows:
                        meta = BlockMetadata(num_rows=rows, size_bytes=None, input_files=[mf.source],
                                             exec_stats=None)
                        tasks.append(ReadTask(
                            lambda mf=mf, group=group, start=start: _read_row_group(fs, mf, group, start, schema,
                                                                                    block_rows),
                            meta, per_task_row_limit=per_task_row_limit,
                        ))
                    start += rows
            return tasks

    return ManifestDatasource()


# ---------------------------------------------------------------- validation and resume

@dataclass(frozen=True)
class PriorResult:
    """What the result manifest already says about one image of a row."""

    status: str
    error: str | None
    attempts: int


@dataclass(frozen=True)
class RowPlan:
    """Size, bucket and batching group of a valid row's images; `fusion` is the first record of a fused row."""

    width: int
    height: int
    bucket: int
    snapped: bool
    group: str
    fusion: dict | None = None


def plan_row(row: ManifestRow, planner, helpers: dict[str, HelperModel], source: str) -> RowPlan:
    """How the job's model (`planner`, a PanGuDraw without weights) makes a row; ValueError when it cannot.

    `helpers` holds the checked `helper_model` values; a value not in it is checked here and added.
    """
    if row.helper_model is None:
        if row.output_width is not None:
            raise ValueError("field 'output_width': expected only together with helper_model (the low-resolution "
                             "model that starts a super-resolution image), which is empty")
        plan = planner.plan(request_for(row, 0))
        return RowPlan(plan.size.width, plan.size.height, plan.size.bucket, plan.size.snapped,
                       f"{plan.size.width}x{plan.size.height}:{row.steps}:{row.sampler}:{len(plan.branches)}")
    helper = helpers.get(row.helper_model)
    if helper is None:
        helper = helpers[row.helper_model] = check_helper_model(row.helper_model, planner.config)
    fused = plan_fused_row(row, planner, helper, source)
    return RowPlan(fused.width, fused.height, fused.bucket, fused.snapped, fused.group, fused.record)


def validate_record(record: dict, *, defaults: GenerationDefaults, planner,
                    duplicates: dict[tuple[str, int], tuple[str, int]],
                    helpers: dict[str, HelperModel] | None = None) -> ManifestRow | InvalidRow:
    """One manifest record (with `__source` and `__row_index`) as a valid row or an invalid one with the reason.

    With a `planner` (a PanGuDraw without weights) a row whose size or sampler the model cannot use is invalid too,
    and so is a Coop-Diffusion row whose helper model, control image path or output size cannot be used.
    """
    record = dict(record)
    source, index = record.pop(SOURCE_COLUMN), record.pop(INDEX_COLUMN)
    repeated = duplicates.get((source, index))
    seen = {repeated[0]: repeated[1]} if repeated else {}
    valid, invalid = validate_rows([record], defaults=defaults, source=source, start_index=index, seen_ids=seen)
    if invalid:
        return invalid[0]
    row = valid[0]
    if planner is None:
        return row
    try:
        plan_row(row, planner, {} if helpers is None else helpers, source)
    except ValueError as exc:
        return InvalidRow(row_id=row.row_id, row_index=index, source=source,
                          message=f"row {index} (id {row.row_id!r}): {exc}", prompt=row.prompt,
                          passthrough=row.passthrough)
    return row


class ValidateStage:
    """Ray Data callable class: manifest records in, units out; units already done are left out (resume).

    An image whose result says `ok` is not made again. A row that is invalid for the same reason as last time
    (or a repeat of an id that is done) is not recorded again. A failed image is tried again, counting its attempts.
    """

    def __init__(self, *, defaults: GenerationDefaults, model_config: ModelConfig, split_rule: str = "reference",
                 duplicates: dict | None = None, prior: dict[tuple[str, int], PriorResult] | None = None,
                 helpers: dict[str, HelperModel] | None = None):
        from diffusion.model import PanGuDraw

        self.defaults = defaults
        # Planning needs the config only (sizes, buckets, timesteps), not the weights.
        self.planner = PanGuDraw(model_config, split_rule=split_rule)
        self.duplicates = duplicates or {}
        self.prior = prior or {}
        # Checked once per job by the driver (`check_helper_models`); values missing here are checked on first use.
        self.helpers = dict(helpers or {})

    def __call__(self, table: pa.Table) -> pa.Table:
        units = []
        for record in table.to_pylist():
            source = record[SOURCE_COLUMN]
            row = validate_record(record, defaults=self.defaults, planner=self.planner, duplicates=self.duplicates,
                                  helpers=self.helpers)
            units.extend(self.units_of(row, source))
        return to_table(units)

    def units_of(self, row: ManifestRow | InvalidRow, source: str = "") -> list[dict]:
        if isinstance(row, InvalidRow):
            prior = self.prior.get((row.row_id, 0))
            # Recorded before: the same reason again, or a repeated id whose first row is done.
            if prior is not None and (prior.status == "ok" or (prior.status == INVALID and prior.error == row.message)):
                return []
            return [{"row_id": row.row_id, "image_index": 0, "status": INVALID, "error": row.message,
                     "attempts": 0, "row": dump_row(row)}]
        plan = plan_row(row, self.planner, self.helpers, source)
        fusion = None if plan.fusion is None else json.dumps(plan.fusion, sort_keys=True)
        units = []
        for image_index in range(row.num_images):
            prior = self.prior.get((row.row_id, image_index))
            if prior is not None and prior.status == "ok":
                continue
            attempts = (prior.attempts if prior is not None else 0) + 1
            unit = {
                "row_id": row.row_id, "image_index": image_index, "status": PENDING, "attempts": attempts,
                "row": dump_row(row), "width": plan.width, "height": plan.height, "bucket": plan.bucket,
                "size_snapped": plan.snapped, "group": plan.group, "started_at": utc_now(), "fusion": fusion,
            }
            units.append(unit)
        return units


# ---------------------------------------------------------------- `pangudraw validate`

@dataclass
class ValidationReport:
    manifest: Manifest
    valid_rows: int
    invalid_rows: int
    images: int
    errors: list[str]


def validate_manifest(uri: str, *, s3: S3Settings | None = None, defaults: GenerationDefaults | None = None,
                      model_config: ModelConfig | None = None, max_errors: int = 20,
                      block_rows: int = 4096) -> ValidationReport:
    """Check a whole manifest in this process, without generating: the same checks as a job makes."""
    from diffusion.model import PanGuDraw

    defaults = defaults or GenerationDefaults()
    manifest = open_manifest(uri, s3, defaults)
    planner = PanGuDraw(model_config) if model_config is not None else None
    helpers: dict[str, HelperModel] = {}
    valid = invalid = images = 0
    errors: list[str] = []
    for mf in manifest.files:
        start = 0
        for group, rows in enumerate(mf.row_group_rows):
            for block in _read_row_group(manifest.filesystem, mf, group, start, manifest.schema, block_rows):
                for record in block.to_pylist():
                    row = validate_record(record, defaults=defaults, planner=planner,
                                          duplicates=manifest.duplicates, helpers=helpers)
                    if isinstance(row, InvalidRow):
                        invalid += 1
                        if len(errors) < max_errors:
                            errors.append(f"{row.source}: {row.message}")
                    else:
                        valid += 1
                        images += row.num_images
            start += rows
    return ValidationReport(manifest, valid, invalid, images, errors)

