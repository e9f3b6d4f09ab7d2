"""Convolution on CPU: MindSpore's own kernel against im2col + one matmul (`diffusion.nets.layers.Conv2d`).

For each (batch, in channels, out channels, side) of the sizes our networks use, the same `Conv2d` cell (same
weights) is built twice, with PANGUDRAW_CONV=native and PANGUDRAW_CONV=im2col, and timed forward and forward +
backward (gradients of the weights), both compiled with `mindspore.jit`, taking turns at every repeat. The matmul
rate of the machine is recorded beside them. Writes JSON to --out.

    .venv/bin/python benchmarks/conv_cpu.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = [  # (batch, cin, cout, side): UNet levels of the tiny model and bench-small, the tiny VAE at 64x64
    (32, 32, 32, 16), (32, 64, 64, 8), (2, 64, 64, 32), (8, 128, 128, 16), (64, 16, 16, 64), (64, 3, 16, 64),
]


def _median_time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "conv_cpu.json"))
    args = parser.parse_args(argv)

    import mindspore as ms
    from mindspore import nn, ops

    from diffusion import runtime
    from diffusion.nets import layers

    runtime.configure("cpu")

    class Loss(nn.Cell):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def construct(self, x):
            return (self.net(x) ** 2).mean()

    def build(mode: str, cin: int, cout: int):
        os.environ["PANGUDRAW_CONV"] = mode
        try:
            conv = layers.Conv2d(cin, cout, 3, padding=1)
        finally:
            os.environ.pop("PANGUDRAW_CONV", None)
        assert conv.im2col == (mode == "im2col")
        return conv

    rows = []
    for batch, cin, cout, side in SIZES:
        x = ms.Tensor(np.random.default_rng(0).standard_normal((batch, cin, side, side), dtype=np.float32))
        nets = {m: build(m, cin, cout) for m in ("native", "im2col")}
        nets["im2col"].weight.set_data(nets["native"].weight.value())
        nets["im2col"].bias.set_data(nets["native"].bias.value())
        calls = {}
        for m, net in nets.items():
            fwd = ms.jit(net.construct)
            grad = ms.value_and_grad(Loss(net), None, net.trainable_params())
            step = ms.jit(grad)
            calls[m] = (fwd, step)
        diff = float(np.abs(calls["native"][0](x).asnumpy() - calls["im2col"][0](x).asnumpy()).max())
        times = {m: {"forward": [], "forward_backward": []} for m in nets}
        for m, (fwd, step) in calls.items():  # warm-up (compilation)
            fwd(x).asnumpy()
            step(x)[0].asnumpy()
        for _ in range(args.repeats):
            for m, (fwd, step) in calls.items():
                times[m]["forward"] += _median_time(lambda: fwd(x).asnumpy(), 1)
                times[m]["forward_backward"] += _median_time(lambda: step(x)[0].asnumpy(), 1)
        macs = batch * side * side * 9 * cin * cout
        row = {"batch": batch, "cin": cin, "cout": cout, "side": side, "macs": macs, "max_abs_difference": diff}
        for m in nets:
            for k, v in times[m].items():
                row[f"{m}_{k}_s"] = statistics.median(v)
        row["forward_speedup"] = row["native_forward_s"] / row["im2col_forward_s"]
        row["forward_backward_speedup"] = row["native_forward_backward_s"] / row["im2col_forward_backward_s"]
        row["native_forward_gmac_per_s"] = macs / row["native_forward_s"] / 1e9
        row["im2col_forward_gmac_per_s"] = macs / row["im2col_forward_s"] / 1e9
        rows.append(row)
        print(json.dumps(row), flush=True)

    a = ms.Tensor(np.random.default_rng(1).standard_normal((1024, 1024), dtype=np.float32))

    def matmul(x):
        return ops.matmul(x, x)

    mm = ms.jit(matmul)
    mm(a).asnumpy()
    matmul_s = statistics.median(_median_time(lambda: mm(a).asnumpy(), args.repeats))
    report = {
        "benchmark": "conv_cpu",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg()},
        "mindspore": ms.__version__,
        "matmul_1024_gmac_per_s": 1024**3 / matmul_s / 1e9,
        "sizes": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
