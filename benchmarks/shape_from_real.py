"""Where a model loses (or makes) the shapes: sampling that starts from real images of the prompts.

For each start step k of an N-step schedule, real synthetic images of held-out prompts are encoded by the model's
VAE, noised to step k's sigma (x = x0 + sigma_k * eps, the sampler's own parametrisation) and sampled from step k to
the end with the prompt; the attribute classifier reads the results. k = 0 is ordinary generation from pure noise;
the steps before the model's split are the structure generator's, the others the texture generator's. A model that
keeps the shape from step k keeps what the real image had at that noise level; where the read shape falls, the
generator of those steps is what loses it. With --one-step the classifier reads the model's guided x0 prediction
at step k instead (one UNet call from the noised real image): what the generator of that step believes the image
is, before any later step can sharpen or change it. JSON out (adherence per start step).

    .venv/bin/python benchmarks/shape_from_real.py --model diffusion/shipped/pangu-draw-tiny --starts 0,4,8,11,16 \
        --count 24 --out benchmarks/results/shape_from_real.json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("shape_from_real")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the shipped tiny model)")
    parser.add_argument("--starts", default="0,2,4,6,8,11,16", help="start steps k, comma-separated")
    parser.add_argument("--count", type=int, default=24, help="held-out prompts (64x64 bucket)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--aesthetic", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one-step", action="store_true",
                        help="read the x0 prediction of step k (one UNet call) instead of the finished sample")
    parser.add_argument("--out", default="benchmarks/results/shape_from_real.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from diffusion import buckets, evaluation, runtime, synthetic
    from diffusion.model import GenerationRequest, PanGuDraw

    runtime.configure("cpu")
    model = PanGuDraw.load(args.model)
    classifier = evaluation.Classifier.load()
    sizes = buckets.bucket_sizes(model.config.bucket_scales[0])
    square = min(range(len(sizes)), key=lambda i: abs(sizes[i][0] / sizes[i][1] - 1.0))
    prompts = synthetic.evaluation_prompts(args.count, aspect_buckets=(square,))
    width, height = sizes[square]
    requests = [GenerationRequest(prompt=p.prompt, seed=p.seed, width=width, height=height, steps=args.steps,
                                  guidance_scale=args.guidance, aesthetic_scale=args.aesthetic) for p in prompts]
    real = evaluation.real_images_for(prompts)
    targets = [{"shape": p.shape, "colour": p.colour, "background": p.background, "pattern": p.pattern}
               for p in prompts]
    plan = model.plan(requests[0])
    sigmas = model.schedule.sampling_sigmas(plan.timesteps)
    conds = model.encode(requests)
    x0 = model.encode_images(np.stack(real))
    eps = np.random.default_rng(args.seed).standard_normal(x0.shape).astype(np.float32)
    report = {"benchmark": "shape_from_real", "model": str(args.model or "shipped"), "count": len(prompts),
              "steps": args.steps, "split": plan.split, "guidance_scale": args.guidance,
              "aesthetic_scale": args.aesthetic, "read": "x0 prediction of the start step" if args.one_step
              else "finished sample",
              "real_images": evaluation.adherence(classifier.predict(real), targets),
              "vae_round_trip": evaluation.adherence(classifier.predict(list(model.decode(x0))), targets),
              "starts": []}
    for k in sorted({int(s) for s in args.starts.split(",") if s.strip()}):
        if not 0 <= k < args.steps:
            parser.error(f"start step {k} is outside 0..{args.steps - 1}")
        t0 = time.perf_counter()
        sigma = np.float32(sigmas[k])
        x = x0 + sigma * eps if k > 0 else eps * np.float32(np.sqrt(sigmas[0] ** 2 + 1.0))
        if args.one_step:
            seen = {}

            def keep(x_cur, i, denoised):
                seen["x0"] = denoised
                return denoised

            model.run_steps(requests, conds, x, range(k, k + 1), {}, fuse=keep)
            latents = seen["x0"]
        else:
            latents = model.run_steps(requests, conds, x, range(k, len(plan.timesteps)), {})
        result = evaluation.adherence(classifier.predict(list(model.decode(latents))), targets)
        row = {"start_step": k, "timestep": int(plan.timesteps[k]), "sigma": float(sigma),
               "first_unet": "structure" if k < plan.split else "texture", "adherence": result,
               "seconds": time.perf_counter() - t0}
        report["starts"].append(row)
        logger.info("start step %d (t=%d, %s): %s", k, row["timestep"], row["first_unet"], result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
