"""Cost per image of each Coop-Diffusion mode against plain sampling, on tiny models on CPU.

Modes (all at the primary's 64x64, the same rows, seeds and steps):
  plain                  the primary alone
  latent_bridge          + a helper with another latent space (SD-1.5-style f=8 VAE, scale 0.18215), every step
  latent_bridge_early    the same helper in the first half of the steps only (the cheap setting of SPEC section 8)
  resolution_bridge      + a 32x32 helper (another resolution, Up/Down inside the bridge), every step
  multi_control          both helpers at once, the low-resolution one seeing a control image
  super_resolution       one-stage: the 32x32 model for t >= t_switch, then the 64x64 model from Up(x0) + sigma * xi
  plain_low              the 32x32 model alone (what super-resolution starts from)

For each: seconds per image (the fastest of --repeats rounds that interleave the modes, after a warm-up call
that is reported apart, and the median; wall and CPU seconds, since this machine is shared), the ratio to plain, and network calls per image with their seconds (UNet
calls, each one row with its guidance branches; VAE decodes and encodes; text encoders). For super-resolution it also reports how much of the 32x32
model's layout the 64x64 image keeps: the correlation of 8x8 grey-level thumbnails with the 32x32 model's own image
and with the x0 it handed over, against the same figures for the plain 64x64 model. The models are random unless --primary/--other/--low name trained
model directories, so images are noise and only costs and the layout figure's relation mean something.

    .venv/bin/python benchmarks/coop_cost.py --steps 20 --rows 2 --repeats 3
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
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("coop_cost")


def _count_calls(model, label: str, counts: Counter, seconds: Counter) -> None:
    """Count and time the model's network calls by component (its compiled forwards are looked up through `_fwd`)."""
    lookup = model._fwd

    def counting(name):
        fn = lookup(name)

        def call(*arrays):
            start = time.perf_counter()
            out = fn(*arrays)
            counts[f"{label}.{name}"] += 1
            seconds[f"{label}.{name}"] += time.perf_counter() - start
            return out

        return call

    model._fwd = counting


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _measure(modes: dict, rows: int, repeats: int, counts: Counter, seconds: Counter) -> dict:
    """Wall and CPU seconds per image of each mode over `repeats` rounds after a warm-up call each. The rounds
    interleave the modes, so load from other work on this shared machine falls on all of them alike; calls and their
    seconds come from each mode's fastest run (the one least disturbed)."""
    warmup = {}
    for name, fn in modes.items():
        logger.info("warm-up %s", name)
        warmup[name] = _timed(fn)[1]
    runs: dict[str, list] = {name: [] for name in modes}
    for round_index in range(repeats):
        logger.info("round %d of %d", round_index + 1, repeats)
        for name, fn in modes.items():
            counts.clear()
            seconds.clear()
            _, wall, cpu = _timed(fn)
            runs[name].append((wall / rows, cpu / rows, {k: v / rows for k, v in counts.items()},
                               {k: v / rows for k, v in seconds.items()}, os.getloadavg()[0]))
    results = {}
    for name, mode_runs in runs.items():
        walls, cpus = [r[0] for r in mode_runs], [r[1] for r in mode_runs]
        fastest = min(mode_runs, key=lambda r: r[0])
        call_seconds = dict(sorted(fastest[3].items()))
        results[name] = {
            "seconds_per_image": min(walls), "median_seconds_per_image": statistics.median(walls),
            "cpu_seconds_per_image": min(cpus), "times_s": walls, "warmup_s": warmup[name],
            "calls_per_image": dict(sorted(fastest[2].items())), "call_seconds_per_image": call_seconds,
            "unet_seconds_per_image": sum(v for k, v in call_seconds.items() if k.endswith("_unet")),
            "vae_seconds_per_image": sum(v for k, v in call_seconds.items() if ".vae_" in k),
            "load_avg": [r[4] for r in mode_runs],
        }
    return results


def _thumb(images: np.ndarray, side: int = 8) -> np.ndarray:
    from diffusion.coop import resize_pixels

    grey = images.astype(np.float32).mean(axis=-1)[:, None]
    return resize_pixels(grey, (side, side))[:, 0].reshape(len(images), -1)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(_thumb(a), _thumb(b))]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--t-switch", type=int, default=500)
    parser.add_argument("--primary", help="model directory of the 64x64 primary (default: random tiny)")
    parser.add_argument("--other", help="model directory with another latent space (default: random tiny-sd15)")
    parser.add_argument("--low", help="model directory of the 32x32 model (default: random tiny-lowres)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "coop_cost.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from diffusion import coop, runtime
    from diffusion.config import tiny_config, tiny_lowres_config, tiny_sd15_config
    from diffusion.model import GenerationRequest, PanGuDraw
    from diffusion.tiny import build_random_model

    runtime.configure("cpu")
    tmp = tempfile.TemporaryDirectory()
    dirs = {}
    for label, given, config, seed in (("primary", args.primary, tiny_config(), 0),
                                       ("other", args.other, tiny_sd15_config(), 1),
                                       ("low", args.low, tiny_lowres_config(), 2)):
        dirs[label] = given or str(build_random_model(Path(tmp.name) / label, config=config, seed=seed))
    models = {label: PanGuDraw.load(path) for label, path in dirs.items()}
    counts: Counter = Counter()
    seconds: Counter = Counter()
    for label, model in models.items():
        _count_calls(model, label, counts, seconds)
    primary, other, low = models["primary"], models["other"], models["low"]

    prompts = ["a red circle on a blue background", "蓝色背景上的绿色条纹正方形", "a yellow dotted triangle",
               "a purple checked star"]
    requests = [GenerationRequest(prompt=prompts[i % len(prompts)], seed=100 + i, steps=args.steps)
                for i in range(args.rows)]
    yy, xx = np.mgrid[:32, :32]
    control = np.zeros((32, 32, 3), np.uint8)
    control[(yy - 16) ** 2 + (xx - 16) ** 2 < 100] = (255, 40, 40)

    def fused(helpers):
        return lambda: coop.coop_generate(primary, requests, helpers)

    modes = {
        "plain": lambda: primary.sample(requests, primary.encode(requests)),
        "latent_bridge": fused([coop.CoopHelper(other, weight=0.5)]),
        "latent_bridge_early": fused([coop.CoopHelper(other, weight=0.5, window=(0.0, 0.5))]),
        "resolution_bridge": fused([coop.CoopHelper(low, weight=0.5)]),
        "multi_control": fused([coop.CoopHelper(other, weight=0.3),
                                coop.CoopHelper(low, weight=0.3, control_image=control)]),
        "super_resolution": lambda: coop.super_resolve(low, primary, requests, args.t_switch),
        "plain_low": lambda: low.sample(requests, low.encode(requests)),
    }
    results = _measure(modes, args.rows, args.repeats, counts, seconds)
    base = results["plain"]
    for res in results.values():
        res["ratio_to_plain"] = res["seconds_per_image"] / base["seconds_per_image"]
        res["cpu_ratio_to_plain"] = res["cpu_seconds_per_image"] / base["cpu_seconds_per_image"]

    sr = coop.plan_super_resolution(low, primary, requests, args.t_switch)
    low_images = low.decode(low.sample(requests, low.encode(requests)))
    handed_over = low.decode(coop.low_stage(low, sr))
    sr_images = primary.decode(coop.super_resolve(low, primary, requests, args.t_switch))
    plain_images = primary.decode(primary.sample(requests, primary.encode(requests)))
    layout = {
        "handover_step": sr.handover_step, "steps": sr.steps, "handover_sigma": sr.handover_sigma,
        # 8x8 grey thumbnails, Pearson correlation, mean over rows.
        "thumbnail_correlation": {
            "super_resolution_vs_low_image": _correlation(sr_images, low_images),
            "super_resolution_vs_handed_over_x0": _correlation(sr_images, handed_over),
            "plain_primary_vs_low_image": _correlation(plain_images, low_images),
            "plain_primary_vs_handed_over_x0": _correlation(plain_images, handed_over),
        },
    }
    report = {
        "benchmark": "coop_cost",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {"steps": args.steps, "rows": args.rows, "repeats": args.repeats, "t_switch": args.t_switch,
                     "sampler": requests[0].sampler, "guidance_branches": 3, "primary_size": [64, 64],
                     "low_size": [32, 32], "models": {k: dict(m.identity) for k, m in models.items()},
                     "trained": {k: m.trained for k, m in models.items()}},
        "modes": results,
        "super_resolution_layout": layout,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    logger.info("wrote %s", out)
    for name, res in results.items():
        logger.info("%-20s %.3f s/image (x%.2f of plain)", name, res["seconds_per_image"], res["ratio_to_plain"])
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
