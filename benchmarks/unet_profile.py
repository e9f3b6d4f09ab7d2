"""Where a UNet forward spends its time: our graph-mode MindSpore UNet against diffusers, operator by operator.

Profiles one forward of the `bench-small` UNet (../shared/bench-small.md) at a given batch with MindSpore's profiler
(kernel time per operator type) and, in the torch venv of unet_speed.py, with torch.profiler (self CPU time per
operator) and torch's FLOP counter. Reports milliseconds per forward for each operator type, the matrix-product
share (MindSpore MatMul/BatchMatMul; torch convolution, addmm, mm, bmm and attention), the rest, the wall time per
forward, and the gap between the wall time and the summed kernel times (the runtime's own cost per launch). The
profilers add their own overhead, so the wall times come from separate timed forwards, medians of --repeats.
Run it on a quiet machine. JSON out.

    .venv/bin/python benchmarks/unet_profile.py --torch-python /tmp/torchenv/bin/python
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

MS_GEMM = ("MatMul", "BatchMatMul")
TORCH_GEMM = ("aten::mkldnn_convolution", "aten::addmm", "aten::mm", "aten::bmm",
              "aten::_scaled_dot_product_flash_attention_for_cpu")


def profile_mindspore(batch: int, latent: int, repeats: int) -> dict:
    from mindspore import Profiler

    from diffusion import runtime
    from diffusion.config import BENCH_SMALL_UNET as cfg
    from unet_speed import MindSporeTimer

    runtime.configure("cpu")
    timer = MindSporeTimer(cfg, graph=True, latent=latent)
    timer.forward(batch)
    wall = float(np.median([timer.forward(batch)[0] for _ in range(repeats)]))
    out_dir = Path(tempfile.mkdtemp(prefix="ms-profile-"))
    try:
        profiler = Profiler(output_path=str(out_dir))
        profiled = 3
        for _ in range(profiled):
            timer.forward(batch)
        profiler.stop()
        profiler.analyse()
        table = next(out_dir.rglob("cpu_op_type_info_*.csv"))
        ops: dict[str, float] = {}
        with table.open() as f:
            for row in csv.DictReader(f):
                ops[row["op_type"]] = float(row["total_compute_time"]) / profiled
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"wall_s": wall, "op_ms_per_forward": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            "gemm_names": list(MS_GEMM)}


def profile_torch(python: str, batch: int, latent: int, threads: int, repeats: int) -> dict:
    from diffusion.config import BENCH_SMALL_UNET as cfg
    from unet_speed import TorchTimer

    timer = TorchTimer(python, cfg, latent=latent, threads=threads, time_id_width=32)
    try:
        timer.forward(batch)
        wall = float(np.median([timer.forward(batch)[0] for _ in range(repeats)]))
        return {"wall_s": wall, "implementation": timer.info["implementation"], **timer.profile(batch),
                "gemm_names": list(TORCH_GEMM)}
    finally:
        timer.close()


def summarise(side: dict, gemm: tuple[str, ...], flops: int | None) -> dict:
    ops = side["op_ms_per_forward"]
    gemm_ms = sum(v for k, v in ops.items() if k in gemm)
    kernel_ms = sum(ops.values())
    out = {"wall_ms": side["wall_s"] * 1000.0, "kernel_ms": kernel_ms, "gemm_ms": gemm_ms,
           "other_kernel_ms": kernel_ms - gemm_ms, "wall_minus_kernels_ms": side["wall_s"] * 1000.0 - kernel_ms}
    if flops:
        out["gemm_gflop_per_s"] = flops / (gemm_ms / 1000.0) / 1e9 if gemm_ms else None
        out["whole_forward_gflop_per_s"] = flops / side["wall_s"] / 1e9
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--torch-python", default="/tmp/torchenv/bin/python")
    parser.add_argument("--out", default="benchmarks/results/unet_profile.json")
    args = parser.parse_args(argv)

    report = {"benchmark": "unet_profile", "net": "bench-small", "batch": args.batch, "latent": args.latent,
              "threads": args.threads, "host": platform.node(), "cpus": os.cpu_count(),
              "load_before": os.getloadavg()}
    ours = profile_mindspore(args.batch, args.latent, args.repeats)
    report["mindspore"] = ours
    flops = None
    if Path(args.torch_python).is_file():
        theirs = profile_torch(args.torch_python, args.batch, args.latent, args.threads, args.repeats)
        report["torch"] = theirs
        flops = theirs["flops"]
        report["torch_summary"] = summarise(theirs, TORCH_GEMM, flops)
    report["mindspore_summary"] = summarise(ours, MS_GEMM, flops)
    report["load_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for side in ("mindspore_summary", "torch_summary"):
        if side in report:
            print(side, json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in report[side].items()}))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
