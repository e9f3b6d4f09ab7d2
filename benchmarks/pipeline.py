"""Throughput of the Ray pipeline against an in-process loop of the same model over the same rows.

Both sides make the same images (one shape, so one compiled graph per stage). Reported, as JSON:
  in_process          images/s of `PanGuDraw` stage calls in one process, batch by batch, after a warm-up batch
                      (compilation) that is reported apart; and seconds per image of each stage in that loop
  pipeline            `run_pipeline` on a local Ray: wall time, time to the first image (start-up: actors,
                      model loading, compilation), steady images/s after the first quarter of the images, and the
                      stage seconds per image the actors measured
  ratio               pipeline steady images/s / in-process images/s, measured in this run
  efficiency          achieved (steady) / ceiling, ceiling = devices / device-seconds per image (DESIGN.md). On
                      CPU a device is a core and the device-seconds per image are the CPU seconds the
                      in-process loop spent per image (it keeps about one core busy, running one stage at a
                      time; the pipeline runs the stages side by side, so it can beat the loop).

The machine may be shared: CPU seconds of this process are reported beside wall seconds for the in-process side.

    .venv/bin/python benchmarks/pipeline.py --rows 96 --steps 20 --batch-size 4
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("benchmarks.pipeline")
STAGES = ("encode", "structure", "texture", "decode")


def in_process(model_dir: Path, requests, batch_size: int) -> dict:
    """Stage by stage in one process: a warm-up batch, then every batch timed."""
    from diffusion.model import PanGuDraw

    model = PanGuDraw.load(model_dir)
    batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
    if len(batches[-1]) < batch_size:
        batches.pop()  # a short last batch would compile another shape; the pipeline pads it instead

    def run(batch) -> dict[str, float]:
        times = {}
        t0 = time.perf_counter()
        conds = model.encode(batch)
        times["encode"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        handoffs = model.sample_structure(batch, conds)
        times["structure"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        latents = model.sample_texture(batch, conds, handoffs)
        times["texture"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.decode(latents)
        times["decode"] = time.perf_counter() - t0
        return times

    start = time.perf_counter()
    warm = run(batches[0])
    warmup_s = time.perf_counter() - start
    cpu0, wall0 = time.process_time(), time.perf_counter()
    timed = [run(b) for b in batches]
    wall = time.perf_counter() - wall0
    images = sum(len(b) for b in batches)
    per_image = {s: sum(t[s] for t in timed) / images for s in STAGES}
    return {
        "images": images, "batch_size": batch_size, "warmup_batch_s": warmup_s,
        "warmup_stage_s": warm, "wall_s": wall, "cpu_s": time.process_time() - cpu0,
        "images_per_s": images / wall, "stage_seconds_per_image": per_image,
        "median_batch_s": statistics.median(sum(t.values()) for t in timed),
    }


def pipeline(manifest: Path, out: Path, model_dir: Path, args) -> dict:
    import pyarrow.compute as pc

    from jobs import results
    from jobs.pipeline import PipelineOptions, run_pipeline
    from schemas.job import JobSpec
    from storage import open_store

    actors = {s: args.actors for s in STAGES} if args.actors else {}
    spec = JobSpec.from_dict({
        "manifest": str(manifest), "output": str(out), "model": str(model_dir),
        "defaults": {"steps": args.steps, "aesthetic_scale": args.aesthetic_scale},
        "stages": {"batch_size": args.batch_size, "actors": actors},
    })
    start = time.time()
    result = run_pipeline(spec, PipelineOptions(block_rows=args.batch_size, progress_seconds=3600))
    wall = time.time() - start
    table = results.read_results(open_store(str(out)))
    finished = sorted(datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
                      for t in table["finished_at"].to_pylist())
    # Steady state: the images after the first quarter (which holds the start-up burst: while the first batches
    # compile downstream, the upstream stages queue work that then drains at once).
    n = len(finished)
    quarter = max(n // 4, 1)
    span = finished[-1] - finished[quarter - 1]
    steady = (n - quarter) / span if n >= 8 and span > 0 else None
    s = result.summary
    return {
        "images": s.ok, "failed": s.failed, "wall_s": wall, "first_image_s": finished[0] - start,
        "images_per_s_overall": s.ok / wall, "steady_images_per_s": steady,
        "stage_seconds_per_image": s.stage_seconds_per_image, "actors_per_stage": s.actors_per_stage,
        "expected_efficiency_from_placement": s.expected_efficiency,
        "ok_all": bool(pc.all(pc.equal(table["status"], "ok")).as_py()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: a random tiny model)")
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--aesthetic-scale", type=float, default=4.0)
    parser.add_argument("--actors", type=int, default=0, help="actors per model stage (default: the driver chooses)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "pipeline.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffusion.model import GenerationRequest
    from diffusion.tiny import CORPUS, build_random_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = Path(args.model) if args.model else build_random_model(tmp / "model", seed=0)
        prompts = [CORPUS[i % len(CORPUS)] for i in range(args.rows)]
        pq.write_table(pa.table({"row_id": [f"b-{i:04d}" for i in range(args.rows)], "prompt": prompts,
                                 "seed": pa.array(range(args.rows), pa.int64())}), tmp / "manifest.parquet")
        requests = [GenerationRequest(prompt=p, seed=i, steps=args.steps, aesthetic_scale=args.aesthetic_scale)
                    for i, p in enumerate(prompts)]
        logger.info("in-process loop over %d rows", args.rows)
        loop = in_process(model_dir, requests, args.batch_size)
        logger.info("Ray pipeline over the same rows")
        ray_side = pipeline(tmp / "manifest.parquet", tmp / "out", model_dir, args)

    # On CPU the device is a core: device-seconds per image are the CPU seconds the in-process loop spent per image
    # (it runs one stage at a time and does not keep every core busy), and the ceiling is every core doing that.
    devices = os.cpu_count() or 1
    device_seconds = loop["cpu_s"] / loop["images"]
    ceiling = devices / device_seconds
    achieved = ray_side["steady_images_per_s"] or ray_side["images_per_s_overall"]
    report = {
        "benchmark": "pipeline", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                             "load_average_1m": os.getloadavg()[0]},
        "settings": {"rows": args.rows, "steps": args.steps, "batch_size": args.batch_size,
                     "aesthetic_scale": args.aesthetic_scale, "model": args.model or "random tiny (64x64)",
                     "device": "cpu"},
        "in_process": loop, "pipeline": ray_side,
        "ratio_pipeline_to_in_process": achieved / loop["images_per_s"],
        "device_seconds_per_image": device_seconds, "ceiling_images_per_s": ceiling, "devices": devices,
        "efficiency": achieved / ceiling,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("ratio_pipeline_to_in_process", "efficiency")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
