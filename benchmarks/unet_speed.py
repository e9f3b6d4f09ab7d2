"""UNet speed on CPU: our MindSpore UNet in graph and eager mode, and the same network in PyTorch diffusers.

For each network (`bench-small` of ../shared/bench-small.md, and the tiny preset's UNet) this measures
  - seconds per forward at each batch size (median of --repeats after one warm-up call; warm-up reported apart),
  - seconds per image of a guided Euler loop (batch 2 = one image with classifier-free guidance, batch 8 = four),
    where one step is UNet + guidance + Euler update, compiled as one graph in graph mode,
and, for bench-small, the same figures for diffusers' `UNet2DConditionModel` configured identically, run by the
python of a separate venv with torch and diffusers (`--torch-python`), in the same run and with the same threads.
Wall and CPU seconds are both recorded (this machine is shared; CPU seconds suffer less from other load), and so
is the load average around each block. Writes JSON to --out.

    .venv/bin/python benchmarks/unet_speed.py --torch-python /tmp/torchenv/bin/python
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("unet_speed")

GUIDANCE = 6.0


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _series(fn, repeats: int) -> dict:
    runs = [_timed(fn) for _ in range(repeats)]
    walls, cpus = [r[0] for r in runs], [r[1] for r in runs]
    return {"median_s": statistics.median(walls), "min_s": min(walls), "times_s": walls,
            "cpu_median_s": statistics.median(cpus)}


def _net_inputs(cfg, batch: int, latent: int, seed: int):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((batch, cfg.in_channels, latent, latent)).astype(np.float32),
        "context": rng.standard_normal((batch, 77, cfg.context_dim)).astype(np.float32),
        "y": rng.standard_normal((batch, cfg.adm_in_channels)).astype(np.float32),
    }


def measure_mindspore(cfg, *, graph: bool, batches, steps_list, repeats: int, latent: int, loop_repeats: int) -> dict:
    import mindspore as ms
    from mindspore import ops

    from diffusion.nets.unet import UNet, count_parameters
    from diffusion.schedule import Schedule

    net = UNet(cfg)
    net.set_train(False)
    schedule = Schedule()

    def guided_step(x, t, sigma, sigma_next, context, y):
        scaled = x / ops.sqrt(sigma * sigma + 1.0)
        eps = net(ops.concat((scaled, scaled), axis=0), t, context, y)
        uncond, cond = ops.chunk(eps, 2, axis=0)
        guided = uncond + GUIDANCE * (cond - uncond)
        return x + (sigma_next - sigma) * guided

    forward = ms.jit(net.construct) if graph else net
    step = ms.jit(guided_step) if graph else guided_step
    result = {"mode": "graph" if graph else "eager", "parameters": count_parameters(net), "forward": {}, "euler": {}}
    for batch in batches:
        data = _net_inputs(cfg, batch, latent, seed=batch)
        x, context, y = (ms.Tensor(data[k]) for k in ("x", "context", "y"))
        t = ms.Tensor(np.full((batch,), 999, np.int32))
        run = lambda: forward(x, t, context, y).asnumpy()  # noqa: E731 (asnumpy waits for the result)
        load = os.getloadavg()[0]
        warmup_s, _ = _timed(run)
        stats = _series(run, repeats)
        result["forward"][str(batch)] = dict(stats, warmup_s=warmup_s, load_avg_1min=load)
        logger.info("%s batch %d forward: median %.4f s (warm-up %.2f s)", result["mode"], batch,
                    stats["median_s"], warmup_s)

        images = batch // 2
        if images < 1:
            continue
        rng = np.random.default_rng(0)
        for steps in steps_list:
            timesteps = schedule.timesteps(steps)
            sigmas = np.append(schedule.sigmas[timesteps], 0.0).astype(np.float32)
            t_batch = [ms.Tensor(np.full((batch,), int(ts), np.int32)) for ts in timesteps]
            sig = [ms.Tensor(np.array(s, np.float32)) for s in sigmas]
            start = rng.standard_normal((images, cfg.in_channels, latent, latent)).astype(np.float32)

            def loop():
                lat = ms.Tensor(start * np.sqrt(sigmas[0] ** 2 + 1.0))
                for i in range(steps):
                    lat = step(lat, t_batch[i], sig[i], sig[i + 1], context, y)
                return lat.asnumpy()

            warm = _timed(lambda: step(ms.Tensor(start), t_batch[0], sig[0], sig[1], context, y).asnumpy())[0]
            load = os.getloadavg()[0]
            stats = _series(loop, loop_repeats)
            result["euler"].setdefault(str(batch), {})[str(steps)] = {
                "seconds": stats["median_s"], "cpu_seconds": stats["cpu_median_s"], "images": images,
                "seconds_per_image": stats["median_s"] / images, "step_warmup_s": warm, "load_avg_1min": load}
            logger.info("%s batch %d euler %d steps: %.3f s per image", result["mode"], batch, steps,
                        stats["median_s"] / images)
    return result


def measure_torch(python: str, cfg, *, batches, steps_list, repeats: int, latent: int, threads: int,
                  time_id_width: int, loop_repeats: int) -> dict:
    config = dict(cfg.model_dump(), time_id_width=time_id_width)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, out_path = Path(tmp) / "cfg.json", Path(tmp) / "out.json"
        cfg_path.write_text(json.dumps(config))
        cmd = [python, str(REPO / "benchmarks" / "diffusers_reference.py"), "unet-bench", str(cfg_path), str(out_path),
               "--threads", str(threads), "--repeats", str(repeats), "--latent", str(latent),
               "--loop-repeats", str(loop_repeats),
               "--batches", *map(str, batches), "--steps", *map(str, steps_list)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        load = os.getloadavg()[0]
        subprocess.run(cmd, check=True, env=env, timeout=3600)
        result = json.loads(out_path.read_text())
    result["load_avg_1min_at_start"] = load
    return result


def ratios(graph: dict, eager: dict | None, torch: dict | None) -> dict:
    """Speed-ups as time(other) / time(ours in graph mode): above 1 means graph mode is faster."""
    out = {}
    for batch, stats in graph["forward"].items():
        if eager:
            out[f"forward_b{batch}_eager_over_graph"] = eager["forward"][batch]["median_s"] / stats["median_s"]
        if torch:
            out[f"forward_b{batch}_torch_over_graph"] = torch["forward"][batch]["median_s"] / stats["median_s"]
            out[f"forward_b{batch}_torch_over_graph_cpu"] = (
                torch["forward"][batch].get("cpu_median_s", float("nan")) / stats["cpu_median_s"])
    for batch, by_steps in graph["euler"].items():
        for steps, stats in by_steps.items():
            if eager and batch in eager["euler"] and steps in eager["euler"][batch]:
                out[f"euler{steps}_b{batch}_eager_over_graph"] = (
                    eager["euler"][batch][steps]["seconds"] / stats["seconds"])
            if torch and batch in torch["euler"] and steps in torch["euler"][batch]:
                out[f"euler{steps}_b{batch}_torch_over_graph"] = torch["euler"][batch][steps]["seconds"] / stats["seconds"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "unet_speed.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per batch size (median reported)")
    parser.add_argument("--loop-repeats", type=int, default=1, help="timed Euler loops per setting")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 40])
    parser.add_argument("--nets", nargs="+", default=["bench-small", "tiny"], choices=["bench-small", "tiny"])
    parser.add_argument("--no-eager", action="store_true", help="skip eager mode (the slowest part)")
    parser.add_argument("--eager-steps", type=int, nargs="+", default=None,
                        help="Euler step counts for eager mode (default: same as --steps)")
    parser.add_argument("--torch-python", default=os.environ.get("PANGUDRAW_TORCH_PYTHON", "/tmp/torchenv/bin/python"),
                        help="python of a venv with torch and diffusers; skipped when it does not exist")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import mindspore as ms
    import mindspore.device_context.cpu.op_tuning as cpu_tuning

    cpu_tuning.threads_num(args.threads)
    from diffusion.config import BENCH_SMALL_UNET, tiny_config

    tiny = tiny_config()
    nets = {
        # bench-small: 32x32 latent; y = pooled text 128 + bucket sinusoid 32.
        "bench-small": (BENCH_SMALL_UNET, 32, 32),
        "tiny": (tiny.structure_unet, 64 // tiny.vae.downsample_factor, tiny.bucket_embed_dim),
    }
    have_torch = Path(args.torch_python).exists()
    report = {
        "benchmark": "unet_speed",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads, "python": platform.python_version()},
        "mindspore": ms.__version__,
        "guidance_scale": GUIDANCE,
        "goal": "graph-mode UNet step at least 20% faster than PyTorch diffusers (torch_over_graph >= 1.2)",
        "nets": {},
    }
    for name in args.nets:
        cfg, latent, time_id_width = nets[name]
        entry = {"config": cfg.model_dump(), "latent": latent}
        entry["mindspore_graph"] = measure_mindspore(cfg, graph=True, batches=args.batches, steps_list=args.steps,
                                                     repeats=args.repeats, latent=latent,
                                                     loop_repeats=args.loop_repeats)
        torch_result = None
        if name == "bench-small" and have_torch:
            torch_result = measure_torch(args.torch_python, cfg, batches=args.batches, steps_list=args.steps,
                                         repeats=args.repeats, latent=latent, threads=args.threads,
                                         time_id_width=time_id_width, loop_repeats=args.loop_repeats)
            entry["torch_diffusers"] = torch_result
        eager = None
        if not args.no_eager:
            eager = measure_mindspore(cfg, graph=False, batches=args.batches, steps_list=args.eager_steps or args.steps,
                                      repeats=args.repeats, latent=latent, loop_repeats=args.loop_repeats)
            entry["mindspore_eager"] = eager
        entry["ratios"] = ratios(entry["mindspore_graph"], eager, torch_result)
        report["nets"][name] = entry
        logger.info("%s ratios: %s", name, json.dumps(entry["ratios"], indent=1))
    if "bench-small" in report["nets"] and "torch_diffusers" in report["nets"]["bench-small"]:
        r = report["nets"]["bench-small"]["ratios"]
        report["goal_met"] = all(v >= 1.2 for k, v in r.items() if "torch_over_graph" in k and not k.endswith("_cpu"))
    else:
        report["goal_met"] = None
        report["torch_skipped"] = f"no python at {args.torch_python}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    logger.info("wrote %s", out)


if __name__ == "__main__":
    main()
