"""How fast can a bench-small UNet forward be on this CPU at all? A bound from its matrix products alone.

Nearly every multiply-add of the bench-small forward (../shared/bench-small.md) is in a matrix product: our UNet
computes convolutions as im2col + matmul, and linears, attention and the GroupNorm statistics as matmuls too.
This script records every matrix product of one eager forward at batch 2 (operand shapes and counts, through
`ops.matmul` and `nn.Dense`), then times each distinct product alone, in one run and with the same threads:
  - in MindSpore graph mode (as our forward calls it: `ops.matmul` broadcasting, `nn.Dense`'s transposed weight),
  - in PyTorch (in the torch venv of unet_speed.py; `torch.matmul` and `F.linear`),
ten products per timed call that share one operand and differ in the other (graph mode merges identical
products), median of --repeats, and sums count x time. The MindSpore sum is what the matrix products of our forward cost with MindSpore's CPU kernels,
before any other kernel or launch: a lower bound on our forward with these kernels. It also times the whole forward
in both (our graph-mode UNet, diffusers), and reports the speed goal of the model-core issue (our forward at most
torch's / 1.2) against that bound. JSON out. Run it on a quiet machine.

    .venv/bin/python benchmarks/gemm_bound.py --torch-python /tmp/torchenv/bin/python
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

GOAL_RATIO = 1.2
REFERENCE = ("matmul", (2048, 2048), (2048, 2048))  # a large square product: each library's best case

TORCH_SCRIPT = r"""
import json, sys, time, numpy as np, torch
torch.set_num_threads(int(sys.argv[1])); repeats = int(sys.argv[2]); products = json.loads(sys.argv[3])
rng = np.random.default_rng(0)
out = []
for kind, a_shape, b_shape in products:
    # As on the MindSpore side: a dense layer's weight, or a matmul's left operand, differs ten times.
    if kind == "dense":
        a = torch.from_numpy(rng.standard_normal(a_shape, dtype=np.float32))
        ws = [torch.from_numpy(rng.standard_normal(b_shape, dtype=np.float32)) for _ in range(10)]
        def ten():
            return [torch.nn.functional.linear(a, w) for w in ws]
    else:
        b = torch.from_numpy(rng.standard_normal(b_shape, dtype=np.float32))
        ws = [torch.from_numpy(rng.standard_normal(a_shape, dtype=np.float32)) for _ in range(10)]
        def ten():
            return [torch.matmul(w, b) for w in ws]
    ten(); ten(); ts = []
    for _ in range(repeats):
        t = time.perf_counter(); ten(); ts.append(time.perf_counter() - t)
    out.append(float(np.median(ts)) / 10)
print(json.dumps({"torch": torch.__version__, "seconds": out}))
"""


def record_products(cfg, batch: int) -> list[tuple[str, tuple, tuple, int]]:
    """(kind, left shape, right shape, count) of every matrix product of one eager bench-small forward."""
    import mindspore as ms
    from mindspore import nn, ops

    import diffusion.nets.layers as layers
    from diffusion.nets.unet import UNet

    calls: collections.Counter = collections.Counter()
    matmul, dense = ops.matmul, nn.Dense.construct

    def recording_matmul(a, b):
        calls[("matmul", tuple(a.shape), tuple(b.shape))] += 1
        return matmul(a, b)

    def recording_dense(self, x):
        # nn.Dense: x reshaped to (rows, in) times weight (out, in) transposed.
        calls[("dense", (int(np.prod(x.shape[:-1])), x.shape[-1]), tuple(self.weight.shape))] += 1
        return dense(self, x)

    ops.matmul = layers.ops.matmul = recording_matmul
    nn.Dense.construct = recording_dense
    try:
        net = UNet(cfg)
        net.set_train(False)
        rng = np.random.default_rng(0)
        net(ms.Tensor(rng.standard_normal((batch, cfg.in_channels, 32, 32), dtype=np.float32)),
            ms.Tensor(np.full((batch,), 999, np.int32)),
            ms.Tensor(rng.standard_normal((batch, 77, cfg.context_dim), dtype=np.float32)),
            ms.Tensor(rng.standard_normal((batch, cfg.adm_in_channels), dtype=np.float32)))
    finally:
        ops.matmul = layers.ops.matmul = matmul
        nn.Dense.construct = dense
    return [(kind, a, b, n) for (kind, a, b), n in sorted(calls.items(), key=lambda kv: -kv[1])]


def flop(kind: str, a: tuple, b: tuple) -> int:
    if kind == "dense":
        return 2 * a[0] * a[1] * b[0]
    batch = int(np.prod(np.broadcast_shapes(a[:-2], b[:-2]))) if len(a) > 2 or len(b) > 2 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def mindspore_seconds(products: list[tuple[str, tuple, tuple]], repeats: int) -> list[float]:
    """Seconds per product in graph mode: ten products with different weight operands per call."""
    import mindspore as ms
    from mindspore import ops

    transposed = ops.MatMul(transpose_b=True)

    # One operand is shared (hot in cache, as in a forward) and the other differs ten times, so that graph mode
    # cannot merge the products: a dense layer's weight, and a matmul's left operand (the weight of an im2col
    # convolution; in attention and the GroupNorm sums, where both sides are activations, the left one).
    def ten_matmuls(b, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9):
        return tuple(ops.matmul(a, b) for a in (a0, a1, a2, a3, a4, a5, a6, a7, a8, a9))

    def ten_denses(a, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9):
        return tuple(transposed(a, b) for b in (b0, b1, b2, b3, b4, b5, b6, b7, b8, b9))

    rng = np.random.default_rng(0)
    out = []
    for kind, a_shape, b_shape in products:
        fn = ms.jit(ten_denses if kind == "dense" else ten_matmuls)
        shared, varied = (a_shape, b_shape) if kind == "dense" else (b_shape, a_shape)
        x = ms.Tensor(rng.standard_normal(shared, dtype=np.float32))
        ws = [ms.Tensor(rng.standard_normal(varied, dtype=np.float32)) for _ in range(10)]

        def call():
            fn(x, *ws)
            ms.runtime.synchronize()

        call()
        call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        out.append(float(np.median(times)) / 10)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gemm_bound.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--torch-python", default=os.environ.get("PANGUDRAW_TORCH_PYTHON", "/tmp/torchenv/bin/python"))
    args = parser.parse_args()
    if not Path(args.torch_python).exists():
        raise SystemExit(f"no torch venv at {args.torch_python} (see benchmarks/README.md, 'UNet speed')")

    from diffusion import runtime
    from diffusion.config import BENCH_SMALL_UNET as cfg
    from unet_speed import MindSporeTimer, TorchTimer

    runtime.configure("cpu")
    recorded = record_products(cfg, args.batch)
    products = [(kind, a, b) for kind, a, b, _ in recorded] + [REFERENCE]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    torch_run = subprocess.run([args.torch_python, "-c", TORCH_SCRIPT, str(args.threads), str(args.repeats),
                                json.dumps(products)], capture_output=True, text=True, env=env, check=True)
    torch_answer = json.loads(torch_run.stdout.strip().splitlines()[-1])
    ms_s, torch_s = mindspore_seconds(products, args.repeats), torch_answer["seconds"]

    rows, totals = [], {"flop": 0, "mindspore_s": 0.0, "torch_s": 0.0}
    for (kind, a, b, count), ms_one, torch_one in zip(recorded, ms_s, torch_s):
        f = flop(kind, a, b)
        rows.append({"kind": kind, "left": list(a), "right": list(b), "count": count,
                     "gflop": round(f * count / 1e9, 4),
                     "mindspore_gflop_per_s": round(f / ms_one / 1e9, 1),
                     "torch_gflop_per_s": round(f / torch_one / 1e9, 1)})
        totals["flop"] += f * count
        totals["mindspore_s"] += ms_one * count
        totals["torch_s"] += torch_one * count
    ref_flop = flop(*REFERENCE)

    ours = MindSporeTimer(cfg, graph=True, latent=32)
    theirs = TorchTimer(args.torch_python, cfg, latent=32, threads=args.threads, time_id_width=32)
    try:
        ours.forward(args.batch)
        theirs.forward(args.batch)
        ours_fwd, torch_fwd = [], []
        for _ in range(args.repeats):  # taking turns, so both see the same load
            ours_fwd.append(ours.forward(args.batch)[0])
            torch_fwd.append(theirs.forward(args.batch)[0])
    finally:
        theirs.close()
    ours_f, torch_f = float(np.median(ours_fwd)), float(np.median(torch_fwd))
    goal_s = torch_f / GOAL_RATIO

    result = {
        "benchmark": "gemm_bound",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu": platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
                    "load_avg_1min": os.getloadavg()[0]},
        "mindspore": __import__("mindspore").__version__,
        "torch": torch_answer["torch"],
        "net": "bench-small",
        "batch": args.batch,
        "square_2048_gflop_per_s": {"mindspore_graph": round(ref_flop / ms_s[-1] / 1e9, 1),
                                    "torch": round(ref_flop / torch_s[-1] / 1e9, 1)},
        "matrix_products": {
            "distinct": len(recorded),
            "calls": sum(r[3] for r in recorded),
            "gflop": round(totals["flop"] / 1e9, 3),
            "mindspore_sum_s": round(totals["mindspore_s"], 4),
            "torch_sum_s": round(totals["torch_s"], 4),
        },
        "forward": {
            "ours_graph_s": round(ours_f, 4),
            "torch_diffusers_s": round(torch_f, 4),
            "torch_over_ours": round(torch_f / ours_f, 3),
            "goal_s": round(goal_s, 4),
            "mindspore_products_alone_over_goal": round(totals["mindspore_s"] / goal_s, 3),
            "goal_reachable_with_these_kernels": totals["mindspore_s"] <= goal_s,
        },
        "products": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("square_2048_gflop_per_s", "matrix_products", "forward")}, indent=2))


if __name__ == "__main__":
    main()
