"""The batch pipeline end to end on a real local Ray: images, result manifests, failures, resume, S3.

One Ray session and one tiny random model serve the whole module. Faults (an encoder that raises, a NaN latent,
an actor that dies mid-batch) are injected by stage subclasses defined inside functions, so Ray ships them by value.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY
from jobs import results
from jobs.pipeline import PipelineOptions, StageClasses, run_pipeline
from schemas.job import JobSpec
from schemas.keys import image_key, safe_key
from storage import open_store

pytestmark = pytest.mark.timeout(600)

STEPS = 4
DEFAULTS = {"steps": STEPS, "aesthetic_scale": 0.0}
ENCODE_FAILS = "ENCODE-FAILS"
NAN_IMAGE = "NAN-IMAGE"
UNSAFE_IDS = ("../../escape", "dir/sub\x01ctl")
PROMPTS = (
    "a red circle on a blue background", "蓝色背景上的红色圆形", "a green striped square on a white background",
    "一只猫 a cat on a sofa", "a photo of a mountain lake at sunrise", "山水画 landscape painting",
)


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def fault_stages(crash_marker: Path | None = None) -> StageClasses:
    """Stages that fail on marked prompts; with `crash_marker`, the first structure batch kills its actor."""
    from actors.encode import EncodeStage
    from actors.structure import StructureStage
    from actors.texture import TextureStage

    class EncodeFailingOnMarker(EncodeStage):
        def encode(self, requests):
            if any(ENCODE_FAILS in r.prompt for r in requests):
                raise RuntimeError("injected encoder failure")
            return super().encode(requests)

    class TextureMakingNaN(TextureStage):
        def sample(self, requests, conds, handoffs):
            latents = super().sample(requests, conds, handoffs)
            for i, request in enumerate(requests):
                if NAN_IMAGE in request.prompt:
                    latents[i] = np.nan
            return latents

    class StructureCrashingOnce(StructureStage):
        def sample(self, requests, conds):
            try:
                os.close(os.open(crash_marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return super().sample(requests, conds)
            os._exit(1)  # the process dies mid-batch, as after a segfault or an OOM kill

    return StageClasses(encode=EncodeFailingOnMarker, texture=TextureMakingNaN,
                        structure=StructureCrashingOnce if crash_marker else StructureStage)


def mixed_manifest(path: Path) -> dict[str, dict]:
    """20 rows: squares, wide rows, two images of one row, a row without id, unsafe ids, faults, invalid rows."""
    rows = []
    for i in range(11):
        row_id = UNSAFE_IDS[i - 9] if i >= 9 else f"sq-{i:02d}"
        rows.append(dict(row_id=row_id, prompt=PROMPTS[i % len(PROMPTS)], seed=100 + i))
    for i in range(3):
        rows.append(dict(row_id=f"wide-{i}", prompt=PROMPTS[i], aspect="16:9", seed=200 + i))
    rows.append(dict(row_id="two-images", prompt=PROMPTS[3], num_images=2, seed=300))
    rows.append(dict(row_id=None, prompt=PROMPTS[4]))  # id and seed derived
    rows.append(dict(row_id="fails-encode", prompt=f"{ENCODE_FAILS} a cat", seed=400))
    rows.append(dict(row_id="nan-image", prompt=f"{NAN_IMAGE} a lake", seed=401))
    rows.append(dict(row_id="empty-prompt", prompt="", seed=500))
    rows.append(dict(row_id="bad-sampler", prompt="a red circle", sampler="magic", seed=501))
    for i, row in enumerate(rows):
        row.update(category=f"cat-{i % 3}", priority=i, score=i / 4,
                   created=dt.datetime(2024, 1, 1, 12, 0, i, tzinfo=dt.timezone.utc))
    columns = ["row_id", "prompt", "seed", "aspect", "num_images", "sampler", "category", "priority", "score",
               "created"]
    types = [pa.string(), pa.string(), pa.int64(), pa.string(), pa.int32(), pa.string(), pa.string(), pa.int64(),
             pa.float64(), pa.timestamp("ms", tz="UTC")]
    table = pa.table({c: pa.array([r.get(c) for r in rows], type=t) for c, t in zip(columns, types)})
    pq.write_table(table, path)
    return {r["row_id"] if r["row_id"] is not None else "manifest-00000015": r for r in rows}


def clean_manifest(path: Path, n: int = 20) -> None:
    table = pa.table({
        "row_id": [f"row-{i:02d}" for i in range(n)],
        "prompt": [PROMPTS[i % len(PROMPTS)] for i in range(n)],
        "seed": pa.array(range(n), pa.int64()),
        "note": [f"note {i}" for i in range(n)],
    })
    pq.write_table(table, path)


def make_spec(manifest, output, model_dir, *, actors: int = 1, batch_size: int = 2, **extra) -> JobSpec:
    return JobSpec.from_dict({
        "manifest": str(manifest), "output": str(output), "model": str(model_dir), "defaults": DEFAULTS,
        "stages": {"batch_size": batch_size,
                   "actors": {s: actors for s in ("encode", "structure", "texture", "decode")}},
        **extra,
    })


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with the sha256 of its bytes."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def load_results(output) -> pa.Table:
    table = results.read_results(open_store(str(output)))
    assert table is not None, "no result shards"
    return table


# ---------------------------------------------------------------- a mixed manifest, two actors per stage

@pytest.fixture(scope="module")
def mixed_job(ray_session, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    rows = mixed_manifest(root / "manifest.parquet")
    spec = make_spec(root / "manifest.parquet", root / "out", tiny_model_dir, actors=2)
    seen = []
    result = run_pipeline(spec, PipelineOptions(block_rows=4, shard_rows=4, progress_seconds=0.01),
                          stages=fault_stages(), on_progress=seen.append)
    return root, rows, spec, result, seen


def test_every_input_row_has_one_result_and_ok_rows_have_their_images(mixed_job):
    root, rows, spec, result, seen = mixed_job
    table = load_results(spec.output)
    records = {(r["row_id"], r["image_index"]): r for r in table.to_pylist()}
    expected = {(rid, i) for rid, row in rows.items() for i in range(row.get("num_images") or 1)}
    assert table.num_rows == len(records) == 21
    assert set(records) == expected

    statuses = {key: r["status"] for key, r in records.items()}
    assert sorted(k for k, s in statuses.items() if s == "failed") == [("fails-encode", 0), ("nan-image", 0)]
    assert sorted(k for k, s in statuses.items() if s == "invalid") == [("bad-sampler", 0), ("empty-prompt", 0)]
    ok = [r for r in records.values() if r["status"] == "ok"]
    assert len(ok) == 17
    out = Path(spec.output)
    for r in ok:
        assert r["image_key"] == image_key(r["row_id"], r["image_index"], r["num_images"], "png")
        data = (out / r["image_key"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"] and len(data) == r["bytes"]
        assert r["image_uri"] == (out / r["image_key"]).resolve().as_uri()
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG" and image.size == (r["width"], r["height"])
        assert (r["width"], r["height"]) == ((80, 48) if r["row_id"].startswith("wide") else (64, 64))
        assert r["model_hash"] and r["attempts"] == 1 and r["steps"] == STEPS
        assert all(r[f"{stage}_s"] > 0 for stage in ("encode", "structure", "texture", "decode", "write"))
    # Readers use the result shards; the images folder holds exactly the ok images and nothing else.
    assert sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file()) == \
        sorted(r["image_key"] for r in ok)
    assert {"images/two-images/0.png", "images/two-images/1.png"} <= {r["image_key"] for r in ok}


def test_failures_are_isolated_and_say_why(mixed_job):
    _, _, spec, result, _ = mixed_job
    records = {r["row_id"]: r for r in load_results(spec.output).to_pylist()}
    assert records["fails-encode"]["error"].startswith("encode: RuntimeError: injected encoder failure")
    assert records["nan-image"]["error"] == "texture: the latent has non-finite values (NaN or inf)"
    assert records["fails-encode"]["image_uri"] is None and records["nan-image"]["sha256"] is None
    empty, bad = records["empty-prompt"]["error"], records["bad-sampler"]["error"]
    assert "(id 'empty-prompt')" in empty and "field 'prompt'" in empty and "expected a non-empty string" in empty
    assert "(id 'bad-sampler')" in bad and "field 'sampler'" in bad and "'magic'" in bad
    assert records["bad-sampler"]["attempts"] == 0
    s = result.summary
    assert (s.total, s.ok, s.failed, s.invalid, s.skipped_existing) == (21, 17, 2, 2, 0)


def test_unsafe_row_ids_stay_inside_the_output(mixed_job):
    root, _, spec, _, _ = mixed_job
    records = {r["row_id"]: r for r in load_results(spec.output).to_pylist()}
    for row_id in UNSAFE_IDS:
        key = records[row_id]["image_key"]
        assert key == f"images/{safe_key(row_id)}.png" and "/" not in safe_key(row_id)
        assert (Path(spec.output) / key).is_file()
    outside = [p for p in root.rglob("*") if p.is_file() and Path(spec.output) not in p.parents]
    assert [p.name for p in outside] == ["manifest.parquet"]


def test_pass_through_columns_survive_with_their_types(mixed_job):
    root, rows, spec, _, _ = mixed_job
    table = load_results(spec.output)
    manifest_schema = pq.read_schema(root / "manifest.parquet")
    for name in ("category", "priority", "score", "created"):
        assert table.schema.field(name).type == manifest_schema.field(name).type
    for r in table.to_pylist():
        source = rows[r["row_id"]]
        assert (r["category"], r["priority"], r["score"], r["created"]) == \
            (source["category"], source["priority"], source["score"], source["created"])
    derived = next(r for r in table.to_pylist() if r["row_id"] == "manifest-00000015")
    assert derived["seed_derived"] is True and derived["status"] == "ok"


def test_job_files_summary_contact_sheet_and_progress(mixed_job):
    _, _, spec, result, seen = mixed_job
    out = Path(spec.output)
    job = json.loads((out / "job.json").read_text())
    assert job["total_rows"] == 20 and job["total_images"] == 21 and job["job_id"] == spec.job_id
    assert job["placement"]["actors"] == {"encode": 2, "structure": 2, "texture": 2, "decode": 2}
    summary = json.loads((out / "_SUCCESS.json").read_text())
    assert (summary["ok"], summary["failed"], summary["invalid"]) == (17, 2, 2)
    assert summary["images_per_s"] > 0 and set(summary["stage_seconds_per_image"]) >= {"structure", "texture"}
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.size[0] > 0 and sheet.size[1] > 0
    assert "sq-00" in (out / "contact_sheet.html").read_text()
    assert seen and (seen[-1].done, seen[-1].ok, seen[-1].failed, seen[-1].invalid) == (21, 17, 2, 2)
    assert all(a.done <= b.done for a, b in zip(seen, seen[1:]))
    assert result.shards_written and all(k.startswith("results/part-") for k in result.shards_written)


def test_pipeline_image_equals_in_process_generate(mixed_job, tiny_model_dir):
    from diffusion.model import GenerationRequest, PanGuDraw

    _, _, spec, _, _ = mixed_job
    records = {(r["row_id"], r["image_index"]): r for r in load_results(spec.output).to_pylist()}
    picked = [records[k] for k in (("sq-00", 0), ("sq-07", 0), ("wide-1", 0), ("two-images", 1),
                                   ("manifest-00000015", 0))]
    model = PanGuDraw.load(tiny_model_dir)
    requests = [GenerationRequest(
        prompt=r["prompt"], seed=r["seed"], negative_prompt=r["negative_prompt"], width=r["requested_width"],
        height=r["requested_height"], aspect=r["requested_aspect"], steps=r["steps"], sampler=r["sampler"],
        guidance_scale=r["guidance_scale"], aesthetic_scale=r["aesthetic_scale"], anime_scale=r["anime_scale"],
        photography_scale=r["photography_scale"]) for r in picked]
    assert picked[3]["seed"] == 301  # image 1 of a row uses the row's seed + 1
    expected = model.generate(requests)
    for r, pixels in zip(picked, expected):
        with Image.open(Path(spec.output) / r["image_key"]) as image:
            stored = np.asarray(image.convert("RGB"))
        assert stored.shape == pixels.shape
        assert stored.tobytes() == pixels.tobytes(), f"{r['row_id']} differs from PanGuDraw.generate"


# ---------------------------------------------------------------- exactly once: kill, resume, rerun

DRIVER_SCRIPT = '''
import sys, time
from actors.writer import WriteStage
from jobs.pipeline import PipelineOptions, StageClasses, run_pipeline
from schemas.job import JobSpec


class SlowWrite(WriteStage):
    """Slow enough that the test can stop the driver while rows are still coming."""

    def __call__(self, table):
        time.sleep(0.7)
        return super().__call__(table)


run_pipeline(JobSpec.from_file(sys.argv[1]), PipelineOptions(block_rows=2, shard_rows=1),
             stages=StageClasses(write=SlowWrite))
'''


@pytest.fixture(scope="module")
def killed_then_resumed(ray_session, tiny_model_dir, tmp_path_factory):
    """Run 1: a driver process killed (SIGKILL) midway. Run 2: resumed, one structure actor dies mid-batch."""
    root = tmp_path_factory.mktemp("resume")
    clean_manifest(root / "manifest.parquet")
    spec = make_spec(root / "manifest.parquet", root / "out", tiny_model_dir)
    (root / "spec.json").write_text(spec.model_dump_json())
    (root / "driver.py").write_text(DRIVER_SCRIPT)
    env = {**os.environ, "RAY_ADDRESS": ray_session}
    driver = subprocess.Popen([sys.executable, str(root / "driver.py"), str(root / "spec.json")], env=env,
                              stdout=subprocess.DEVNULL, stderr=open(root / "driver.log", "wb"))
    store = open_store(spec.output)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            if len(results.shard_keys(store)) >= 2:
                break
            time.sleep(0.1)
        assert driver.poll() is None, f"the driver ended before it could be stopped: {(root / 'driver.log').read_text()[-2000:]}"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert not store.exists(results.SUCCESS_FILE)
    before = load_results(spec.output)
    # What the killed run left half-written, if anything, is not an image; plant one such temporary for certain.
    images_before = {k: v for k, v in snapshot(Path(spec.output) / "images").items() if not k.endswith(".part")}
    planted = Path(spec.output) / "images" / (".row-07.png." + "ab" * 16 + ".part")
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(b"half an image")
    resumed = run_pipeline(spec, PipelineOptions(block_rows=4, shard_rows=4),
                           stages=fault_stages(crash_marker=root / "crashed"))
    assert (root / "crashed").exists()
    assert not planted.exists(), "a finished job leaves no temporary files in its images folder"
    return spec, before, images_before, resumed


def test_killed_job_resumes_generating_only_missing_rows(killed_then_resumed):
    spec, before, images_before, resumed = killed_then_resumed
    committed = {r["row_id"] for r in before.to_pylist() if r["status"] == "ok"}
    assert 0 < len(committed) < 20
    history = results.read_shards(open_store(spec.output))
    assert history.num_rows == 20, "some row was recorded twice"
    table = load_results(spec.output)
    assert sorted(table["row_id"].to_pylist()) == [f"row-{i:02d}" for i in range(20)]
    assert set(table["status"].to_pylist()) == {"ok"} and set(table["attempts"].to_pylist()) == {1}
    assert table["note"].to_pylist() == [f"note {int(r[4:])}" for r in table["row_id"].to_pylist()]
    s = resumed.summary
    assert (s.ok, s.skipped_existing, s.total) == (20 - len(committed), len(committed), 20)
    # Images of the first run were kept as they were, and every row has exactly one image.
    images_after = snapshot(Path(spec.output) / "images")
    assert all(images_after[k] == v for k, v in images_before.items())
    assert sorted(images_after) == [f"row-{i:02d}.png" for i in range(20)]


def test_same_job_again_writes_nothing_new(killed_then_resumed, tiny_model_dir):
    spec, _, _, _ = killed_then_resumed
    out = Path(spec.output)
    before = snapshot(out)
    again = run_pipeline(spec, PipelineOptions(block_rows=4))
    after = snapshot(out)
    assert sorted(after) == sorted(before), "a rerun created or removed objects"
    changed = sorted(k for k in after if after[k] != before[k])
    assert changed == ["_SUCCESS.json", "job.json"]  # rewritten with this run's times; images and shards identical
    assert (again.summary.ok, again.summary.skipped_existing, again.summary.total) == (0, 20, 20)
    assert again.shards_written == []


# ---------------------------------------------------------------- S3 through moto's server

def test_s3_end_to_end(ray_session, tiny_model_dir, s3_bucket, tmp_path, caplog):
    """A manifest prefix of two files on S3 in, images and results on S3 out; no credential is written anywhere."""
    import boto3

    client = boto3.client("s3")
    for part, rows in (("a", range(0, 4)), ("b", range(4, 8))):
        sink = io.BytesIO()
        pq.write_table(pa.table({"row_id": [f"s3-{i}" for i in rows], "prompt": [PROMPTS[i % 6] for i in rows],
                                 "seed": pa.array(list(rows), pa.int64())}), sink)
        client.put_object(Bucket=s3_bucket, Key=f"manifests/{part}.parquet", Body=sink.getvalue())
    output = f"s3://{s3_bucket}/jobs/one"
    spec = make_spec(f"s3://{s3_bucket}/manifests", output, tiny_model_dir)
    caplog.set_level("DEBUG")
    result = run_pipeline(spec, PipelineOptions(block_rows=4))
    assert (result.summary.ok, result.summary.total) == (8, 8)

    store = open_store(output)
    table = results.read_results(store)
    assert sorted(table["row_id"].to_pylist()) == [f"s3-{i}" for i in range(8)]
    for r in table.to_pylist():
        assert r["status"] == "ok" and r["image_uri"] == f"{output}/{r['image_key']}"
        data = store.get(r["image_key"])
        assert hashlib.sha256(data).hexdigest() == r["sha256"]
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (r["width"], r["height"]) == (64, 64)
    keys = store.list()
    assert {"job.json", "_SUCCESS.json", "contact_sheet.png"} <= set(keys)
    written = b"".join(store.get(k) for k in keys if not k.startswith("images/"))
    logged = caplog.text.encode()
    assert FAKE_SECRET_ACCESS_KEY.encode() not in written and FAKE_ACCESS_KEY_ID.encode() not in written
    # The key id is an identifier that botocore's own debug log shows in request headers; the secret is never logged.
    assert FAKE_SECRET_ACCESS_KEY.encode() not in logged
