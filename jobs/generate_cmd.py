"""`pangudraw generate "PROMPT"`: one image in-process, for a quick try of a model."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from schemas.errors import UserError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate one image from a prompt, in this process")
    p.add_argument("prompt")
    p.add_argument("--out", default="pangudraw.png", help="output image file (.png, .jpg, .webp)")
    p.add_argument("--model", default=None, help="model directory (default: the shipped tiny model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--aspect", help="aspect ratio such as 16:9 (instead of --width/--height)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--sampler", default="euler", choices=["euler", "ddim", "euler_ancestral", "dpmpp_2m"])
    p.add_argument("--guidance-scale", type=float, default=6.0)
    p.add_argument("--aesthetic-scale", type=float, default=4.0)
    p.add_argument("--anime-scale", type=float, default=0.0)
    p.add_argument("--photography-scale", type=float, default=0.0)
    p.add_argument("--split-rule", default="reference", choices=["reference", "exact"],
                   help="which steps the structure generator runs (reference: the released one-step lag)")
    p.add_argument("--device", default="cpu", choices=["cpu", "npu"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from diffusion.model import GenerationRequest, PanGuDraw

    out = Path(args.out)
    if out.suffix.lower() not in {".png", ".jpg", ".jpeg", ".webp"}:
        raise UserError(f"--out {out}: expected a .png, .jpg or .webp file name")
    if (args.width is None) != (args.height is None):
        raise UserError("give both --width and --height, or neither")
    model = PanGuDraw.load(args.model, device=args.device, split_rule=args.split_rule, dtype=args.dtype)
    request = GenerationRequest(
        prompt=args.prompt, seed=args.seed, negative_prompt=args.negative_prompt, width=args.width,
        height=args.height, aspect=args.aspect, steps=args.steps, sampler=args.sampler,
        guidance_scale=args.guidance_scale, aesthetic_scale=args.aesthetic_scale, anime_scale=args.anime_scale,
        photography_scale=args.photography_scale,
    )
    try:
        plan = model.plan(request)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if plan.size.snapped:
        log.warning("requested %sx%s is not a bucket of this model; generating %dx%d (bucket %d)",
                    request.width or "-", request.height or "-", plan.size.width, plan.size.height, plan.size.bucket)
    (image,) = model.generate([request])
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(out)
    print(f"{out}: {plan.size.width}x{plan.size.height}, bucket {plan.size.bucket}, seed {args.seed}, "
          f"{request.steps} steps ({plan.split} structure + {request.steps - plan.split} texture), model {model.identity['name']}")
    return 0
