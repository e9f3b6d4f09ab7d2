"""UNet speed on CPU: our MindSpore UNet in graph and eager mode, and the same network in PyTorch diffusers.

For each network (`bench-small` of ../shared/bench-small.md, and the tiny preset's UNet) this measures
  - seconds per forward at each batch size (median of --repeats after one warm-up call; warm-up reported apart),
  - seconds per image of a guided Euler loop (batch 2 = one image with classifier-free guidance, batch 8 = four),
    where one step is UNet + guidance + Euler update, compiled as one graph in graph mode,
and, for bench-small, the same figures for diffusers' `UNet2DConditionModel` configured identically, run by the
python of a separate venv with torch and diffusers (`--torch-python`), in the same run and with the same threads.
The implementations take turns at every repeat, so they share whatever load the machine has; the run first waits
for a quiet machine (--wait-quiet), and wall seconds, CPU seconds and load averages are all recorded.
Writes JSON to --out.

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


class MindSporeTimer:
    """Our UNet in graph mode (`mindspore.jit`) or eager mode; one guided Euler step is one graph in graph mode."""

    def __init__(self, cfg, *, graph: bool, latent: int):
        import mindspore as ms
        from mindspore import ops

        from diffusion.nets.unet import UNet, count_parameters
        from diffusion.schedule import Schedule

        self.ms = ms
        self.cfg, self.latent = cfg, latent
        self.net = UNet(cfg)
        self.net.set_train(False)
        self.parameters = count_parameters(self.net)
        self.schedule = Schedule()
        net = self.net

        def guided_step(x, t, sigma, sigma_next, context, y):
            scaled = x / ops.sqrt(sigma * sigma + 1.0)
            eps = net(ops.concat((scaled, scaled), axis=0), t, context, y)
            uncond, cond = ops.chunk(eps, 2, axis=0)
            return x + (sigma_next - sigma) * (uncond + GUIDANCE * (cond - uncond))

        self.forward_fn = ms.jit(net.construct) if graph else net
        self.step_fn = ms.jit(guided_step) if graph else guided_step
        self.inputs: dict[int, tuple] = {}

    def _inputs(self, batch: int):
        if batch not in self.inputs:
            rng = np.random.default_rng(batch)
            cfg, side, ms = self.cfg, self.latent, self.ms
            self.inputs[batch] = (
                ms.Tensor(rng.standard_normal((batch, cfg.in_channels, side, side)).astype(np.float32)),
                ms.Tensor(rng.standard_normal((batch, 77, cfg.context_dim)).astype(np.float32)),
                ms.Tensor(rng.standard_normal((batch, cfg.adm_in_channels)).astype(np.float32)),
            )
        return self.inputs[batch]

    def forward(self, batch: int) -> tuple[float, float]:
        x, context, y = self._inputs(batch)
        t = self.ms.Tensor(np.full((batch,), 999, np.int32))
        return _timed(lambda: self.forward_fn(x, t, context, y).asnumpy())

    def euler(self, batch: int, steps: int) -> tuple[float, float]:
        ms = self.ms
        _, context, y = self._inputs(batch)
        timesteps = self.schedule.timesteps(steps)
        sigmas = np.append(self.schedule.sigmas[timesteps], 0.0).astype(np.float32)
        ts = [ms.Tensor(np.full((batch,), int(t), np.int32)) for t in timesteps]
        sig = [ms.Tensor(np.array(s, np.float32)) for s in sigmas]
        start = np.random.default_rng(0).standard_normal((batch // 2, self.cfg.in_channels, self.latent, self.latent))
        start = (start * np.sqrt(sigmas[0] ** 2 + 1.0)).astype(np.float32)

        def loop():
            lat = ms.Tensor(start)
            for i in range(steps):
                lat = self.step_fn(lat, ts[i], sig[i], sig[i + 1], context, y)
            return lat.asnumpy()

        return _timed(loop)


class TorchTimer:
    """diffusers' UNet2DConditionModel in a separate venv, driven line by line (diffusers_reference.py unet-serve)."""

    def __init__(self, python: str, cfg, *, latent: int, threads: int, time_id_width: int):
        self.latent = latent
        self.tmp = tempfile.TemporaryDirectory()
        cfg_path = Path(self.tmp.name) / "cfg.json"
        cfg_path.write_text(json.dumps(dict(cfg.model_dump(), time_id_width=time_id_width)))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            [python, str(REPO / "benchmarks" / "diffusers_reference.py"), "unet-serve", str(cfg_path),
             "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._ask({"op": "info"})
        self.parameters = self.info["parameters"]

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch side exited (code {self.proc.wait()})")
        return json.loads(line)

    def forward(self, batch: int) -> tuple[float, float]:
        answer = self._ask({"op": "forward", "batch": batch, "latent": self.latent})
        return answer["wall_s"], answer["cpu_s"]

    def euler(self, batch: int, steps: int) -> tuple[float, float]:
        answer = self._ask({"op": "euler", "batch": batch, "latent": self.latent, "steps": steps,
                            "guidance": GUIDANCE})
        return answer["wall_s"], answer["cpu_s"]

    def profile(self, batch: int, repeats: int = 3) -> dict:
        """FLOPs and operator milliseconds per forward on the torch side (diffusers_reference.UNetTimer.profile)."""
        return self._ask({"op": "profile", "batch": batch, "latent": self.latent, "repeats": repeats})

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.tmp.cleanup()


def wait_for_quiet(max_wait_s: float, threshold: float) -> dict:
    """Wait (up to max_wait_s) until the 1-minute load average drops below threshold; OpenMP-threaded PyTorch
    slows down many-fold on an oversubscribed machine, far more than MindSpore's thread pool, so a busy machine
    would flatter our side."""
    start = time.monotonic()
    while os.getloadavg()[0] >= threshold and time.monotonic() - start < max_wait_s:
        time.sleep(10)
    load = os.getloadavg()[0]
    return {"waited_s": round(time.monotonic() - start, 1), "load_avg_1min": load, "quiet": load < threshold}


def _summary(runs: list[tuple[float, float]]) -> dict:
    walls = [r[0] for r in runs]
    return {"median_s": statistics.median(walls), "min_s": min(walls), "times_s": walls,
            "cpu_median_s": statistics.median(r[1] for r in runs)}


def measure(timers: dict, *, batches, steps_list, eager_steps, repeats: int, loop_repeats: int,
            quiet=lambda: None, disturbed=lambda: False, attempts: int = 1) -> dict:
    """Every implementation in turn at each repeat, so that they share whatever load the machine has.

    `quiet()` is called before every block (it waits for a quiet machine) and its answer is recorded; a block
    after which `disturbed()` is true (other jobs ran meanwhile) is measured again, `attempts` times at most.
    """
    results = {name: {"forward": {}, "euler": {}} for name in timers}

    def block(run_once):
        for attempt in range(1, attempts + 1):
            load_before = quiet()
            runs = run_once()
            if not disturbed():
                break
            logger.info("block disturbed by other load (attempt %d of %d)", attempt, attempts)
        return runs, {"load_before": load_before, "load_avg_1min_after": os.getloadavg()[0], "attempts": attempt}

    for batch in batches:
        warmups = {name: timer.forward(batch)[0] for name, timer in timers.items()}

        def forwards():
            runs = {name: [] for name in timers}
            for _ in range(repeats):
                for name, timer in timers.items():
                    runs[name].append(timer.forward(batch))
            return runs

        runs, conditions = block(forwards)
        for name in timers:
            results[name]["forward"][str(batch)] = dict(_summary(runs[name]), warmup_s=warmups[name], **conditions)
            logger.info("%s batch %d forward: median %.4f s", name, batch,
                        results[name]["forward"][str(batch)]["median_s"])
        if batch < 2:
            continue
        for steps in steps_list:
            active = {n: t for n, t in timers.items() if n != "mindspore_eager" or steps in eager_steps}
            # One step first: graph mode compiles the guided step here, not inside the timed loop.
            warm = {n: t.euler(batch, 1)[0] for n, t in active.items()}

            def loops():
                runs = {name: [] for name in active}
                for _ in range(loop_repeats):
                    for name, timer in active.items():
                        runs[name].append(timer.euler(batch, steps))
                return runs

            runs, conditions = block(loops)
            for name in active:
                stats = _summary(runs[name])
                images = batch // 2
                results[name]["euler"].setdefault(str(batch), {})[str(steps)] = dict(
                    seconds=stats["median_s"], cpu_seconds=stats["cpu_median_s"], images=images,
                    seconds_per_image=stats["median_s"] / images, one_step_warmup_s=warm[name], **conditions)
                logger.info("%s batch %d euler %d steps: %.3f s per image", name, batch, steps,
                            stats["median_s"] / images)
    return results


def ratios(results: dict) -> dict:
    """time(other) / time(ours in graph mode), from the same run: above 1 means graph mode is faster."""
    graph = results["mindspore_graph"]
    out = {}
    for other, key in (("mindspore_eager", "eager"), ("torch_diffusers", "torch")):
        if other not in results:
            continue
        for batch, stats in graph["forward"].items():
            theirs = results[other]["forward"][batch]
            out[f"forward_b{batch}_{key}_over_graph"] = theirs["median_s"] / stats["median_s"]
            # Paired per repeat: each pair ran back to back under the same load.
            pairs = [a / b for a, b in zip(theirs["times_s"], stats["times_s"])]
            out[f"forward_b{batch}_{key}_over_graph_paired_median"] = statistics.median(pairs)
            out[f"forward_b{batch}_{key}_over_graph_cpu"] = theirs["cpu_median_s"] / stats["cpu_median_s"]
        for batch, by_steps in graph["euler"].items():
            for steps, stats in by_steps.items():
                theirs = results[other]["euler"].get(batch, {}).get(steps)
                if theirs:
                    out[f"euler{steps}_b{batch}_{key}_over_graph"] = theirs["seconds"] / stats["seconds"]
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
    parser.add_argument("--eager-steps", type=int, nargs="+", default=[20],
                        help="Euler step counts for eager mode (default 20 only: eager is 10-20x slower)")
    parser.add_argument("--wait-quiet", type=float, default=300.0,
                        help="before each block, seconds to wait at most for the load average to fall below "
                             "--quiet-load (0: no wait)")
    parser.add_argument("--quiet-load", type=float, default=1.5)
    parser.add_argument("--busy-load", type=float, default=3.5,
                        help="a block that ends with a higher load average was disturbed and is measured again")
    parser.add_argument("--attempts", type=int, default=3, help="measurements of a disturbed block at most")
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
        timers = {"mindspore_graph": MindSporeTimer(cfg, graph=True, latent=latent)}
        if not args.no_eager:
            timers["mindspore_eager"] = MindSporeTimer(cfg, graph=False, latent=latent)
        if name == "bench-small" and have_torch:
            timers["torch_diffusers"] = TorchTimer(args.torch_python, cfg, latent=latent, threads=args.threads,
                                                   time_id_width=time_id_width)
        def quiet():
            if args.wait_quiet > 0:
                return wait_for_quiet(args.wait_quiet, args.quiet_load)
            return {"waited_s": 0.0, "load_avg_1min": os.getloadavg()[0]}

        try:
            results = measure(timers, batches=args.batches, steps_list=args.steps, eager_steps=args.eager_steps,
                              repeats=args.repeats, loop_repeats=args.loop_repeats, quiet=quiet,
                              disturbed=lambda: os.getloadavg()[0] > args.busy_load, attempts=args.attempts)
        finally:
            if "torch_diffusers" in timers:
                timers["torch_diffusers"].close()
        entry = {"config": cfg.model_dump(), "latent": latent,
                 "parameters": {n: t.parameters for n, t in timers.items()}}
        if "torch_diffusers" in timers:
            entry["torch_implementation"] = timers["torch_diffusers"].info["implementation"]
        entry.update(results)
        entry["ratios"] = ratios(results)
        report["nets"][name] = entry
        logger.info("%s ratios: %s", name, json.dumps(entry["ratios"], indent=1))
    if "bench-small" in report["nets"] and "torch_diffusers" in report["nets"]["bench-small"]:
        r = report["nets"]["bench-small"]["ratios"]
        report["goal_met"] = all(v >= 1.2 for k, v in r.items() if "torch_over_graph" in k and not k.endswith("_cpu"))
        report["goal_note"] = "goal_met needs every wall-time torch_over_graph ratio of bench-small >= 1.2"
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
