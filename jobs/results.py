"""The output of a job: its layout, result shards, `job.json`, `_SUCCESS.json`, and the result manifest read back.

Layout under the job's output URI:

    job.json                  the spec (secrets masked), model identity, versions, total_rows; written at start
    images/<key>.<ext>        one object per image, created only if absent (`schemas.keys.image_key`)
    results/part-<hash>.parquet   result rows; each shard is written after every image it lists, so a shard
                              that exists is a commit. Its name is a hash of the (row id, image index, status,
                              attempts) it holds: writing the same results again names the same shard.
    _SUCCESS.json             the job summary (`schemas.result.JobSummary`); written last
    contact_sheet.png/.html   the first images with their prompts

The result manifest is the union of the shards, one record per (row_id, image_index): an `ok` record when there is
one, else the latest (by `finished_at`). Earlier records of the same image (a failure that a rerun fixed) stay in
their shards as history. Readers use the shards, never a listing of `images/`.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.manifest import PriorResult
from schemas.result import JobSummary, result_schema
from storage import NotFound, Store

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
SUCCESS_FILE = "_SUCCESS.json"
RESULTS_PREFIX = "results/"
IMAGES_PREFIX = "images/"
CONTACT_SHEET_PNG = "contact_sheet.png"
CONTACT_SHEET_HTML = "contact_sheet.html"


def shard_key(table: pa.Table) -> str:
    """Deterministic shard name from the (row id, image index, status, attempts) of its rows."""
    keys = sorted(zip(table["row_id"].to_pylist(), table["image_index"].to_pylist(), table["status"].to_pylist(),
                      table["attempts"].to_pylist()))
    digest = hashlib.sha256(json.dumps(keys, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()
    return f"{RESULTS_PREFIX}part-{digest[:24]}.parquet"


def write_shard(store: Store, table: pa.Table) -> str | None:
    """Write one result shard create-only; returns its key, or None when the same shard already exists."""
    sink = io.BytesIO()
    pq.write_table(table, sink)
    key = shard_key(table)
    created = store.put_if_absent(key, sink.getvalue(), "application/vnd.apache.parquet")
    return key if created else None


class ResultSink:
    """Collects result rows as they stream to the driver and commits them in shards.

    A shard is written once `shard_rows` rows are waiting or `shard_seconds` have passed since the last one, so
    a job killed midway loses at most that much bookkeeping (its images stay; a rerun finds them in place).
    """

    def __init__(self, store: Store, passthrough: pa.Schema, *, shard_rows: int = 1000, shard_seconds: float = 30.0):
        self.store = store
        self.schema = result_schema(passthrough)
        self.shard_rows = shard_rows
        self.shard_seconds = shard_seconds
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.last_flush = time.monotonic()
        self.shards: list[str] = []

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table.cast(self.schema) if table.schema != self.schema else table)
            self.pending_rows += table.num_rows
        self.maybe_flush()

    def maybe_flush(self) -> None:
        due = time.monotonic() - self.last_flush >= self.shard_seconds
        if self.pending_rows >= self.shard_rows or (due and self.pending_rows):
            self.flush()

    def flush(self) -> None:
        if self.pending_rows:
            table = pa.concat_tables(self.pending)
            key = write_shard(self.store, table)
            if key:
                self.shards.append(key)
            log.debug("committed %d result rows in %s", table.num_rows, key or "an existing shard")
        self.pending, self.pending_rows = [], 0
        self.last_flush = time.monotonic()


# ---------------------------------------------------------------- reading results back

def shard_keys(store: Store) -> list[str]:
    return [k for k in store.list(RESULTS_PREFIX) if k.endswith(".parquet")]


def read_shards(store: Store, columns: list[str] | None = None, threads: int = 8) -> pa.Table | None:
    """Every record of every shard (the history), or None when there are no shards yet."""
    keys = shard_keys(store)
    if not keys:
        return None

    def read(key: str) -> pa.Table:
        table = store.read_parquet(key)
        return table.select([c for c in columns if c in table.column_names]) if columns else table

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(keys)))) as pool:
        tables = list(pool.map(read, keys))
    return pa.concat_tables(tables, promote_options="permissive")


def latest_per_image(table: pa.Table) -> pa.Table:
    """One record per (row_id, image_index): the latest ok record when there is one, else the latest record."""
    if table.num_rows == 0:
        return table
    ok = pc.equal(table["status"], "ok")
    ordered = table.append_column("__ok", pc.fill_null(ok, False)).sort_by([
        ("row_id", "ascending"), ("image_index", "ascending"), ("__ok", "descending"), ("finished_at", "descending"),
    ])
    ids, idx = ordered["row_id"].combine_chunks(), ordered["image_index"].combine_chunks()
    n = ordered.num_rows
    changed = pc.or_(pc.not_equal(ids.slice(1), ids.slice(0, n - 1)),
                     pc.not_equal(idx.slice(1), idx.slice(0, n - 1)))
    first = pa.concat_arrays([pa.array([True]), pc.fill_null(changed, True)])
    return ordered.filter(first).drop_columns(["__ok"])


def read_results(store: Store, columns: list[str] | None = None) -> pa.Table | None:
    """The result manifest: the union of the shards, one record per (row_id, image_index); None without shards."""
    needed = None if columns is None else list(dict.fromkeys([*columns, "row_id", "image_index", "status",
                                                               "finished_at"]))
    table = read_shards(store, needed)
    if table is None:
        return None
    table = latest_per_image(table)
    return table.select(columns) if columns else table


def prior_results(store: Store) -> dict[tuple[str, int], PriorResult]:
    """What earlier runs of this job recorded, per (row_id, image_index), for resuming."""
    table = read_results(store, ["row_id", "image_index", "status", "error", "attempts"])
    if table is None:
        return {}
    prior = {}
    for row in table.to_pylist():
        prior[(row["row_id"], row["image_index"])] = PriorResult(row["status"], row["error"], row["attempts"] or 0)
    return prior


# ---------------------------------------------------------------- job.json and _SUCCESS.json

def write_json(store: Store, key: str, payload: dict[str, Any]) -> None:
    store.put(key, (json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n").encode(),
              "application/json")


def read_json(store: Store, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(store.get(key))
    except NotFound:
        return None


def write_summary(store: Store, summary: JobSummary) -> None:
    write_json(store, SUCCESS_FILE, summary.model_dump(mode="json"))


def read_summary(store: Store) -> JobSummary | None:
    payload = read_json(store, SUCCESS_FILE)
    return None if payload is None else JobSummary.model_validate(payload)
