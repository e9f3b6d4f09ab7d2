"""The same networks in PyTorch diffusers, for cross-checks and speed comparisons. Runs in a separate venv.

This script never imports the project (its venv has torch and diffusers, not MindSpore); configs arrive as
JSON dumps of our pydantic configs. Subcommands:

  unet-export CONFIG.json WEIGHTS.safetensors INPUTS.npz OUTPUTS.npz [--seed N]
      build a random `UNet2DConditionModel` equivalent to our UNetConfig, save its weights in diffusers names,
      run it on INPUTS (x, timesteps, context, pooled, time_ids) and save `eps`.
  vae-export CONFIG.json WEIGHTS.safetensors INPUTS.npz OUTPUTS.npz [--seed N]
      the same for `AutoencoderKL` and a VAEConfig: INPUTS has image and z; OUTPUTS has moments and decoded.
  unet-serve CONFIG.json [--threads 2]
      build the UNet once, then time forwards and guided Euler loops on request (JSON lines on stdin/stdout).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def unet_from_config(cfg: dict):
    """A diffusers UNet2DConditionModel with the layout of our UNetConfig (SDXL-style, linear projections).

    Our label input y = concat(pooled, sinusoid(time_id, width)) is diffusers' "text_time" addition embedding
    with one time id of width `time_id_width` (an extra key of the JSON config).
    """
    from diffusers import UNet2DConditionModel

    widths = [cfg["model_channels"] * m for m in cfg["channel_mult"]]
    depth = list(cfg["transformer_depth"])
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth]
    up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)]
    # diffusers' `attention_head_dim` is the number of heads per block (a historical misnomer).
    heads = [max(w // cfg["num_head_channels"], 1) for w in widths]
    layers = [max(d, 1) for d in depth]  # a level without attention ignores its entry
    if cfg["transformer_depth_middle"] != depth[-1]:
        raise SystemExit("diffusers ties the mid-block depth to the last level's depth")
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(widths),
        layers_per_block=cfg["num_res_blocks"],
        norm_num_groups=cfg["norm_groups"],
        cross_attention_dim=cfg["context_dim"],
        transformer_layers_per_block=tuple(layers),
        attention_head_dim=tuple(heads),
        use_linear_projection=cfg["use_linear_in_transformer"],
        addition_embed_type="text_time",
        addition_time_embed_dim=time_id_width(cfg),
        projection_class_embeddings_input_dim=cfg["adm_in_channels"],
    )


def time_id_width(cfg: dict) -> int:
    """Width of the sinusoid part of y (the rest is the pooled text vector), given by the caller in the JSON."""
    return cfg["time_id_width"]


def vae_from_config(cfg: dict):
    from diffusers import AutoencoderKL

    levels = len(cfg["ch_mult"])
    return AutoencoderKL(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg["ch"] * m for m in cfg["ch_mult"]),
        layers_per_block=cfg["num_res_blocks"],
        latent_channels=cfg["z_channels"],
        norm_num_groups=cfg["norm_groups"],
        mid_block_add_attention=cfg["mid_attention"],
    )


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (diffusers zero-initialises some layers, which would hide mapping mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            scale = 0.1 if p.ndim == 1 else 1.0 / fan_in ** 0.5
            noise = torch.randn(p.shape, generator=gen) * scale
            p.copy_(noise + 1.0 if p.ndim == 1 and ("norm" in name and name.endswith("weight")) else noise)


def save_state(model: torch.nn.Module, path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def unet_export(args) -> None:
    cfg = json.load(open(args.config))
    torch.manual_seed(args.seed)
    model = unet_from_config(cfg)
    randomize(model, args.seed)
    model.eval()
    save_state(model, args.weights)
    data = np.load(args.inputs)
    with torch.no_grad():
        eps = model(
            torch.from_numpy(data["x"]), torch.from_numpy(data["timesteps"]),
            encoder_hidden_states=torch.from_numpy(data["context"]),
            added_cond_kwargs={"text_embeds": torch.from_numpy(data["pooled"]),
                               "time_ids": torch.from_numpy(data["time_ids"])},
        ).sample
    np.savez(args.outputs, eps=eps.numpy())


def vae_export(args) -> None:
    cfg = json.load(open(args.config))
    torch.manual_seed(args.seed)
    model = vae_from_config(cfg)
    randomize(model, args.seed)
    model.eval()
    save_state(model, args.weights)
    data = np.load(args.inputs)
    with torch.no_grad():
        moments = model.quant_conv(model.encoder(torch.from_numpy(data["image"])))
        decoded = model.decode(torch.from_numpy(data["z"])).sample
    np.savez(args.outputs, moments=moments.numpy(), decoded=decoded.numpy())


class UNetTimer:
    """Times one diffusers UNet on fixed random inputs: one forward, or a guided Euler loop."""

    def __init__(self, cfg: dict, threads: int):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.cfg = cfg
        self.model = unet_from_config(cfg).eval()
        self.inputs: dict[tuple[int, int], tuple] = {}

    def _inputs(self, batch: int, latent: int):
        key = (batch, latent)
        if key not in self.inputs:
            gen = torch.Generator().manual_seed(batch)
            cfg = self.cfg
            pooled = cfg["adm_in_channels"] - time_id_width(cfg)
            self.inputs[key] = (
                torch.randn(batch, cfg["in_channels"], latent, latent, generator=gen),
                torch.randn(batch, 77, cfg["context_dim"], generator=gen),
                {"text_embeds": torch.randn(batch, pooled, generator=gen), "time_ids": torch.full((batch, 1), 5.0)},
            )
        return self.inputs[key]

    def forward(self, batch: int, latent: int) -> None:
        x, context, cond = self._inputs(batch, latent)
        with torch.inference_mode():
            self.model(x, torch.full((batch,), 999), encoder_hidden_states=context, added_cond_kwargs=cond)

    def profile(self, batch: int, latent: int, repeats: int) -> dict:
        """FLOPs of one forward (torch's counter) and self CPU milliseconds per forward by operator (torch.profiler)."""
        from torch.profiler import ProfilerActivity, profile
        from torch.utils.flop_counter import FlopCounterMode

        self.forward(batch, latent)
        with FlopCounterMode(display=False) as counter:
            self.forward(batch, latent)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                self.forward(batch, latent)
        ops = {e.key: e.self_cpu_time_total / 1000.0 / repeats for e in prof.key_averages()}
        return {"flops": int(counter.get_total_flops()),
                "flops_by_op": {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()},
                "op_ms_per_forward": {k: v for k, v in sorted(ops.items(), key=lambda kv: -kv[1]) if v > 0.01}}

    def euler(self, batch: int, latent: int, steps: int, guidance: float) -> None:
        _, context, cond = self._inputs(batch, latent)
        timesteps = np.linspace(999, 0, steps, endpoint=False).astype(np.int64)
        sigmas = _sigmas(timesteps)
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            latents = torch.randn(batch // 2, self.cfg["in_channels"], latent, latent, generator=gen)
            latents = latents * float(np.sqrt(sigmas[0] ** 2 + 1))
            for i, ts in enumerate(timesteps):
                scaled = latents / float(np.sqrt(sigmas[i] ** 2 + 1))
                eps = self.model(torch.cat([scaled, scaled]), torch.full((batch,), int(ts)),
                                 encoder_hidden_states=context, added_cond_kwargs=cond).sample
                uncond, text = eps.chunk(2)
                latents = latents + float(sigmas[i + 1] - sigmas[i]) * (uncond + guidance * (text - uncond))


def unet_serve(args) -> None:
    """One JSON request per stdin line, one JSON answer per stdout line, so a caller can interleave its own runs.

    {"op": "forward", "batch": 2, "latent": 32} or {"op": "euler", "batch": 2, "latent": 32, "steps": 20,
    "guidance": 6.0} -> {"wall_s": ..., "cpu_s": ...}; {"op": "info"} -> implementation, threads, parameters;
    {"op": "profile", "batch": 2, "latent": 32} -> FLOPs and operator milliseconds per forward (UNetTimer.profile).
    """
    timer = UNetTimer(json.load(open(args.config)), args.threads)
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "info":
            import diffusers

            answer = {"implementation": f"diffusers {diffusers.__version__} / torch {torch.__version__}",
                      "threads": torch.get_num_threads(),
                      "parameters": sum(p.numel() for p in timer.model.parameters())}
        elif req["op"] == "profile":
            answer = timer.profile(req["batch"], req["latent"], req.get("repeats", 3))
        else:
            wall, cpu = time.perf_counter(), time.process_time()
            if req["op"] == "forward":
                timer.forward(req["batch"], req["latent"])
            else:
                timer.euler(req["batch"], req["latent"], req["steps"], req["guidance"])
            answer = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        out.write(json.dumps(answer) + "\n")
        out.flush()


def _sigmas(timesteps: np.ndarray) -> np.ndarray:
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alphas = np.cumprod(1.0 - betas)
    sig = np.sqrt((1 - alphas) / alphas)
    return np.append(sig[timesteps], 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in (("unet-export", unet_export), ("vae-export", vae_export)):
        p = sub.add_parser(name)
        p.add_argument("config")
        p.add_argument("weights")
        p.add_argument("inputs")
        p.add_argument("outputs")
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(fn=fn)
    p = sub.add_parser("unet-serve")
    p.add_argument("config")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(fn=unet_serve)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
