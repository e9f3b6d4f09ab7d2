"""Coop-Diffusion rows in the batch pipeline: the fusion stage on a real local Ray, and the checks before it.

One Ray session serves the module (the fixture of tests/test_pipeline.py). The job mixes a plain row with a latent
bridge (a helper of another latent space, named by its directory), a control row and a one-stage super-resolution
row (the builtin low-resolution helper, built into a temporary cache), a row whose control image is missing and a
row whose helper model does not exist.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from actors.fusion import HelperModel, builtin_model_dir, check_helper_model, resolve_control_uri
from actors.rows import INVALID, PENDING, from_table
from diffusion.config import tiny_config, tiny_sd15_config
from jobs import results
from jobs.manifest import INDEX_COLUMN, SOURCE_COLUMN, ValidateStage, open_manifest
from jobs.pipeline import PipelineOptions, choose_placement, fusion_actor_count, fusion_actor_options, run_pipeline
from jobs.run_cmd import register, spec_from_args
from schemas.job import JobSpec
from schemas.manifest import GenerationDefaults
from storage import open_store
# ray_session is the fixture of test_pipeline.py: one local Ray for this module.
from test_pipeline import PROMPTS, STEPS, load_results, make_spec, ray_session, snapshot  # noqa: F401

pytestmark = pytest.mark.timeout(900)

LOWRES = "builtin:tiny-lowres"


def disc_image() -> np.ndarray:
    yy, xx = np.mgrid[:32, :32]
    img = np.full((32, 32, 3), 30, np.uint8)
    img[(yy - 16) ** 2 + (xx - 16) ** 2 < 100] = (230, 40, 40)
    return img


def bars_image() -> np.ndarray:
    img = np.full((32, 32, 3), 220, np.uint8)
    img[:, 4:10] = img[:, 20:26] = (20, 20, 200)
    return img


@pytest.fixture(scope="module")
def helper_cache(tmp_path_factory):
    """Builtin helpers are built into a temporary cache, not the user's."""
    before = os.environ.get("PANGUDRAW_CACHE")
    os.environ["PANGUDRAW_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield Path(os.environ["PANGUDRAW_CACHE"])
    if before is None:
        os.environ.pop("PANGUDRAW_CACHE", None)
    else:
        os.environ["PANGUDRAW_CACHE"] = before


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    """A helper of another latent space (f=8 VAE, latent scale 0.18215), as a plain model directory."""
    from diffusion.tiny import build_random_model

    return build_random_model(tmp_path_factory.mktemp("helpers") / "sd15", config=tiny_sd15_config(), seed=1)


def fused_manifest(root: Path, sd15_dir: Path) -> dict[str, dict]:
    (root / "control").mkdir()
    Image.fromarray(disc_image()).save(root / "control" / "disc.png")
    rows = [
        dict(row_id="plain", prompt=PROMPTS[0], seed=10),
        dict(row_id="bridge", prompt=PROMPTS[2], seed=11, helper_model=str(sd15_dir), helper_weight=0.5),
        dict(row_id="control", prompt=PROMPTS[1], seed=12, helper_model=LOWRES, helper_weight=0.4,
             helper_window="0:0.5", control_image_uri="control/disc.png"),
        dict(row_id="super-res", prompt=PROMPTS[3], seed=13, helper_model=LOWRES, width=32, height=32,
             output_width=64, output_height=64),
        dict(row_id="control-missing", prompt=PROMPTS[4], seed=14, helper_model=LOWRES,
             control_image_uri="control/bars.png"),
        dict(row_id="bad-helper", prompt=PROMPTS[5], seed=15, helper_model=str(root / "no-such-model")),
    ]
    types = {"row_id": pa.string(), "prompt": pa.string(), "seed": pa.int64(), "helper_model": pa.string(),
             "helper_weight": pa.float64(), "helper_window": pa.string(), "control_image_uri": pa.string(),
             "width": pa.int32(), "height": pa.int32(), "output_width": pa.int32(), "output_height": pa.int32()}
    pq.write_table(pa.table({c: pa.array([r.get(c) for r in rows], type=t) for c, t in types.items()}),
                   root / "manifest.parquet")
    return {r["row_id"]: r for r in rows}


@pytest.fixture(scope="module")
def fused_job(ray_session, tiny_model_dir, helper_cache, sd15_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    rows = fused_manifest(root, sd15_dir)
    spec = make_spec(root / "manifest.parquet", root / "out", tiny_model_dir)
    result = run_pipeline(spec, PipelineOptions(block_rows=3, shard_rows=2))
    return root, rows, spec, result


def records_of(spec) -> dict[str, dict]:
    return {r["row_id"]: r for r in load_results(spec.output).to_pylist()}


def stored_pixels(spec, record) -> np.ndarray:
    with Image.open(Path(spec.output) / record["image_key"]) as image:
        return np.asarray(image.convert("RGB"))


def request_of(record):
    from diffusion.model import GenerationRequest

    return GenerationRequest(
        prompt=record["prompt"], seed=record["seed"], negative_prompt=record["negative_prompt"],
        width=record["requested_width"], height=record["requested_height"], aspect=record["requested_aspect"],
        steps=record["steps"], sampler=record["sampler"], guidance_scale=record["guidance_scale"],
        aesthetic_scale=record["aesthetic_scale"], anime_scale=record["anime_scale"],
        photography_scale=record["photography_scale"])


# ---------------------------------------------------------------- end to end on Ray

def test_mixed_manifest_runs_and_fused_rows_say_what_was_fused(fused_job, sd15_dir, helper_cache):
    root, _, spec, result = fused_job
    lowres_dir = builtin_model_dir("tiny-lowres")
    lowres_name = json.loads((lowres_dir / "model.json").read_text())["config"]["name"]
    records = records_of(spec)
    assert {k: r["status"] for k, r in records.items()} == {
        "plain": "ok", "bridge": "ok", "control": "ok", "super-res": "ok", "control-missing": "failed",
        "bad-helper": "invalid"}
    for key in ("plain", "bridge", "control", "super-res"):
        r = records[key]
        assert stored_pixels(spec, r).shape == (64, 64, 3) and (r["width"], r["height"]) == (64, 64)
    plain = records["plain"]
    assert plain["fusion"] is None and plain["fusion_s"] is None and plain["structure_s"] > 0

    bridge = json.loads(records["bridge"]["fusion"])
    assert bridge == {
        "mode": "latent_bridge", "helper_model": str(sd15_dir), "helper_dir": "sd15", "helper_name": "tiny-sd15",
        "helper_hash": bridge["helper_hash"], "weight": 0.5, "window": [0.0, 1.0], "control_image_uri": None,
        "bridge": "pixel", "size": [64, 64], "latent": [4, 16, 16], "helper_size": [64, 64],
        "helper_latent": [4, 8, 8], "fused_steps": [0, 1, 2, 3]}
    assert bridge["helper_hash"] == json.loads((sd15_dir / "model.json").read_text())["hash"]
    control = json.loads(records["control"]["fusion"])
    assert (control["mode"], control["helper_model"], control["helper_dir"], control["helper_name"]) == \
        ("control", LOWRES, lowres_dir.name, lowres_name)
    assert control["control_image_uri"] == (root / "control" / "disc.png").as_uri()
    assert (control["weight"], control["window"], control["fused_steps"]) == (0.4, [0.0, 0.5], [0, 1])
    assert (control["helper_size"], control["helper_latent"]) == ([32, 32], [4, 8, 8])
    assert control["control_mode"] == "latents" and "control_mode" not in bridge
    sr = json.loads(records["super-res"]["fusion"])
    assert {k: sr[k] for k in ("mode", "low_size", "output_size", "low_latent", "latent", "t_switch",
                               "handover_step", "handover_timestep", "steps", "weight", "window")} == {
        "mode": "super_resolution", "low_size": [32, 32], "output_size": [64, 64], "low_latent": [4, 8, 8],
        "latent": [4, 16, 16], "t_switch": 500, "handover_step": 2, "handover_timestep": 499, "steps": STEPS,
        "weight": None, "window": None}
    assert (records["super-res"]["requested_width"], records["super-res"]["output_width"]) == (32, 64)
    for key in ("bridge", "control", "super-res"):
        r = records[key]
        assert r["fusion_s"] > 0 and r["encode_s"] is None and r["structure_s"] is None and r["texture_s"] is None
        assert r["decode_s"] > 0 and r["helper_model"] == json.loads(r["fusion"])["helper_model"]

    job = json.loads((Path(spec.output) / "job.json").read_text())
    assert job["fusion_actors"] == 1 and job["helper_models"][LOWRES]["name"] == lowres_name
    assert "does not exist" in job["helper_models"][str(root / "no-such-model")]["error"]
    s = result.summary
    assert (s.ok, s.failed, s.invalid) == (4, 1, 1)
    assert s.actors_per_stage == {"encode": 1, "structure": 1, "texture": 1, "decode": 1, "fusion": 1}
    assert s.stage_seconds_per_image["fusion"] > 0


def test_failures_of_fused_rows_stay_with_their_rows(fused_job):
    root, _, spec, _ = fused_job
    records = records_of(spec)
    missing = records["control-missing"]
    uri = (root / "control" / "bars.png").as_uri()
    assert missing["error"].startswith(f"fusion: control image {uri} cannot be read (NotFound:")
    assert missing["image_uri"] is None and json.loads(missing["fusion"])["mode"] == "control"
    bad = records["bad-helper"]["error"]
    assert bad.startswith("row 5 (id 'bad-helper'): field 'helper_model': expected a model directory")
    assert f"got '{root / 'no-such-model'}'" in bad and "does not exist" in bad
    assert records["bad-helper"]["attempts"] == 0 and records["bad-helper"]["fusion"] is None


def test_fused_images_equal_in_process_coop_diffusion_and_plain_images_are_unchanged(fused_job, tiny_model_dir,
                                                                                      sd15_dir, helper_cache):
    from diffusion import coop
    from diffusion.model import PanGuDraw

    _, _, spec, _ = fused_job
    records = records_of(spec)
    primary = PanGuDraw.load(tiny_model_dir)
    sd15 = PanGuDraw.load(sd15_dir)
    low = PanGuDraw.load(builtin_model_dir("tiny-lowres"))
    req = {key: request_of(records[key]) for key in ("plain", "bridge", "control", "super-res")}
    expected = {
        "plain": primary.generate([req["plain"]])[0],
        "bridge": primary.decode(coop.coop_generate(primary, [req["bridge"]], [coop.CoopHelper(sd15, 0.5)]))[0],
        "control": primary.decode(coop.coop_generate(primary, [req["control"]], [
            coop.CoopHelper(low, 0.4, (0.0, 0.5), control_image=disc_image())]))[0],
        "super-res": primary.decode(coop.super_resolve(low, primary, [req["super-res"]], 500,
                                                       output_size=(64, 64)))[0],
    }
    for key, pixels in expected.items():
        assert stored_pixels(spec, records[key]).tobytes() == pixels.tobytes(), f"{key} differs"
    # The helpers change the image: fused rows are not the primary's plain image of the same request.
    assert primary.generate([req["bridge"]])[0].tobytes() != expected["bridge"].tobytes()


def test_resume_makes_only_the_failed_fused_row_and_a_rerun_writes_nothing(fused_job):
    root, _, spec, _ = fused_job
    out = Path(spec.output)
    before = records_of(spec)
    images_before = snapshot(out / "images")
    Image.fromarray(bars_image()).save(root / "control" / "bars.png")

    resumed = run_pipeline(spec, PipelineOptions(block_rows=3, shard_rows=2))
    assert (resumed.summary.ok, resumed.summary.failed, resumed.summary.invalid) == (1, 0, 0)
    # Only fused rows were left: the plain path's stages were not started.
    assert resumed.placement.actors == {"decode": 1} and resumed.fusion_actors == 1
    after = records_of(spec)
    fixed = after["control-missing"]
    assert fixed["status"] == "ok" and fixed["attempts"] == 2
    assert json.loads(fixed["fusion"])["fused_steps"] == [0, 1, 2, 3]
    for key in ("plain", "bridge", "control", "super-res", "bad-helper"):
        assert after[key] == before[key]
    images = snapshot(out / "images")
    assert {k: images[k] for k in images_before} == images_before
    assert sorted(images) == sorted([*images_before, "control-missing.png"])
    # Each image has one record per attempt: the failed one stays as history beside the ok one.
    assert results.read_shards(open_store(spec.output)).num_rows == 7

    state = snapshot(out)
    again = run_pipeline(spec, PipelineOptions(block_rows=3))
    now = snapshot(out)
    assert sorted(now) == sorted(state)
    assert sorted(k for k in now if now[k] != state[k]) == ["_SUCCESS.json", "job.json"]
    # The row left to look at names a helper known to be unusable: it is checked again, but no fusion actor starts.
    assert again.shards_written == [] and again.summary.ok == 0 and again.fusion_actors == 0


# ---------------------------------------------------------------- checks before the job (no Ray)

def validate(*rows: dict, source: str = "/data/m.parquet", **kw) -> list[dict]:
    stage = ValidateStage(defaults=GenerationDefaults(steps=4), model_config=tiny_config(), **kw)
    records = [{"row_id": None, "prompt": "a cat", "helper_model": None, "control_image_uri": None,
                "output_width": None, "output_height": None, "width": None, "height": None, **row,
                SOURCE_COLUMN: source, INDEX_COLUMN: i} for i, row in enumerate(rows)]
    return from_table(stage(pa.Table.from_pylist(records)))


def test_fused_rows_are_checked_against_both_models(helper_cache):
    units = validate(
        {"row_id": "plain"},
        {"row_id": "sr", "helper_model": LOWRES, "width": 32, "height": 32, "output_width": 64, "output_height": 64},
        {"row_id": "no-helper", "output_width": 64, "output_height": 64},
        {"row_id": "sr-control", "helper_model": LOWRES, "output_width": 64, "output_height": 64,
         "control_image_uri": "c.png"},
        {"row_id": "sr-odd-size", "helper_model": LOWRES, "width": 32, "height": 32, "output_width": 72,
         "output_height": 72},
        {"row_id": "sr-aspect", "helper_model": LOWRES, "width": 32, "height": 32, "output_width": 80,
         "output_height": 48},
        {"row_id": "unknown-builtin", "helper_model": "builtin:huge"},
        {"row_id": "control", "helper_model": LOWRES, "control_image_uri": "edges/a.png"},
    )
    by_id = {u["row_id"]: u for u in units}
    assert [by_id[k]["status"] for k in ("plain", "sr", "control")] == [PENDING] * 3
    assert by_id["plain"]["fusion"] is None and by_id["plain"]["group"] == "64x64:4:euler:3"
    sr = json.loads(by_id["sr"]["fusion"])
    assert (sr["mode"], sr["low_size"], sr["output_size"]) == ("super_resolution", [32, 32], [64, 64])
    assert (by_id["sr"]["width"], by_id["sr"]["height"], by_id["sr"]["group"]) == \
        (64, 64, "64x64:4:euler:3|super_resolution|builtin:tiny-lowres|32x32")
    assert json.loads(by_id["control"]["fusion"])["control_image_uri"] == "file:///data/edges/a.png"
    expected = {
        "no-helper": "field 'output_width': expected only together with helper_model",
        "sr-control": "field 'control_image_uri': expected no control image on a super-resolution row",
        "sr-odd-size": "field 'output_width': expected a size the job's model makes exactly (the nearest is 64x64)",
        "sr-aspect": "field 'output_width': expected the aspect of the generation size 32x32, got 80x48",
        "unknown-builtin": "field 'helper_model': expected a model directory (model.json, weights, tokenizers) or "
                           "one of builtin:tiny-sd15, builtin:tiny-lowres, builtin:tiny-control, got 'builtin:huge' (unknown builtin",
    }
    for row_id, message in expected.items():
        unit = by_id[row_id]
        assert unit["status"] == INVALID and f"(id '{row_id}'): {message}" in unit["error"], unit["error"]


def test_helper_model_checks_read_no_weights_and_name_the_problem(tmp_path, sd15_dir):
    import shutil

    good = check_helper_model(str(sd15_dir), tiny_config())
    assert good.error is None and good.name == "tiny-sd15" and good.dir == str(sd15_dir)
    broken = tmp_path / "broken"
    shutil.copytree(sd15_dir, broken)
    (broken / "vae.safetensors").unlink()
    assert check_helper_model(str(broken), tiny_config()).error == f"{broken} lacks vae.safetensors"
    other = tiny_config().model_copy(update={"beta_end": 0.02})
    assert "noise schedule" in check_helper_model(str(sd15_dir), other).error
    assert "is not local" in check_helper_model("s3://models/sd15", tiny_config()).error


def test_control_image_paths_are_relative_to_their_manifest():
    assert resolve_control_uri("c/a.png", "/data/m.parquet") == "file:///data/c/a.png"
    assert resolve_control_uri("c/a.png", "s3://bucket/jobs/m.parquet") == "s3://bucket/jobs/c/a.png"
    assert resolve_control_uri("/abs/a.png", "s3://bucket/m.parquet") == "file:///abs/a.png"
    assert resolve_control_uri("s3://b/x.png", "/data/m.parquet") == "s3://b/x.png"


def test_fusion_actors_from_spec_flag_and_manifest(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    spec = spec_from_args(parser.parse_args(["run", "m.parquet", "--fusion-actors", "3"]))
    assert spec.stages.actors.fusion == 3
    pq.write_table(pa.table({"prompt": ["a", "b"], "helper_model": [None, "builtin:tiny-sd15"]}),
                   tmp_path / "m.parquet")
    manifest = open_manifest(str(tmp_path / "m.parquet"))
    assert (manifest.fused_pending, manifest.helper_models) == (1, {"builtin:tiny-sd15"})
    assert fusion_actor_count(spec, manifest) == 3
    assert fusion_actor_count(JobSpec(manifest="m.parquet"), manifest) == 1
    plain = open_manifest(str(tmp_path / "m.parquet"), done={("m-00000001", 0)})
    assert plain.fused_pending == 0 and fusion_actor_count(spec, plain) == 0
    unusable = {"builtin:tiny-sd15": HelperModel("builtin:tiny-sd15", error="broken")}
    assert fusion_actor_count(spec, manifest, unusable) == 0


def test_fusion_actors_hold_an_npu_each_and_leave_the_rest_to_the_other_stages():
    spec = JobSpec(manifest="m.parquet", stages={"device": "npu"})
    seconds = {"encode": 0.05, "structure": 2.0, "texture": 2.0, "decode": 0.5}
    placement = choose_placement(spec, seconds, {"NPU": 8, "CPU": 32}, reserved=2)
    assert placement.devices == 6 and sum(placement.actors.values()) == 6
    assert fusion_actor_options("npu", placement, None)["resources"] == {"NPU": 1.0}
    from schemas.errors import UserError

    with pytest.raises(UserError, match="2 fusion actor\\(s\\) leave none"):
        choose_placement(spec, seconds, {"NPU": 2, "CPU": 32}, reserved=2)
