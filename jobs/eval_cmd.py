"""`pangudraw eval ...`: prompt adherence and a Fréchet distance of a model on the synthetic data set.

    pangudraw eval train-classifier            # the measuring instrument (shipped in diffusion/shipped)
    pangudraw eval model --out eval.json       # the default model on held-out prompts, English/Chinese/mixed
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from schemas.errors import UserError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="measure a model's prompt adherence on the synthetic data set")
    esub = p.add_subparsers(dest="eval_command", metavar="WHAT", required=True)

    c = esub.add_parser("train-classifier", help="train the attribute classifier on real synthetic images")
    c.add_argument("--out", default=None, help="directory to write (default: diffusion/shipped/synthetic-classifier)")
    c.add_argument("--images", type=int, default=6000)
    c.add_argument("--steps", type=int, default=600)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=run_train_classifier)

    m = esub.add_parser("model", help="generate held-out prompts with a model and read the images back")
    m.add_argument("--model", default=None, help="model directory (default: the shipped tiny model)")
    m.add_argument("--classifier", default=None, help="classifier directory (default: the shipped one)")
    m.add_argument("--count", type=int, default=96, help="prompts (cycling English, Chinese, mixed and 2 aspects)")
    m.add_argument("--seen", action="store_true",
                   help="prompt attribute combinations seen in training instead of held-out ones")
    m.add_argument("--steps", type=int, default=40)
    m.add_argument("--sampler", default="euler", choices=["euler", "ddim", "euler_ancestral", "dpmpp_2m"])
    m.add_argument("--guidance-scale", type=float, default=6.0)
    m.add_argument("--aesthetic-scale", type=float, default=4.0)
    m.add_argument("--out", default="eval.json", help="JSON report to write")
    m.add_argument("--grid", default=None, help="also write a contact sheet of the images (PNG)")
    m.set_defaults(func=run_model)


def run_train_classifier(args: argparse.Namespace) -> int:
    from diffusion import evaluation, synthetic

    if args.images < 100 or args.steps < 1:
        raise UserError("--images must be at least 100 and --steps at least 1")
    cfg = synthetic.SyntheticConfig(num_images=args.images, seed=101, include_heldout=True)
    classifier = evaluation.train_classifier(cfg, steps=args.steps, seed=args.seed)
    out = classifier.save(args.out or evaluation.shipped_classifier_dir())
    acc = classifier.info["real_image_accuracy"]
    print(f"{out}: classifier trained; accuracy on fresh real images: "
          + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return 0


def run_model(args: argparse.Namespace) -> int:
    from diffusion import evaluation, synthetic
    from diffusion.model import PanGuDraw

    if args.count < 1:
        raise UserError("--count must be at least 1")
    classifier = evaluation.Classifier.load(args.classifier)
    model = PanGuDraw.load(args.model)
    prompts = synthetic.evaluation_prompts(args.count, heldout=not args.seen)
    report, images = evaluation.evaluate_model(model, classifier, prompts, steps=args.steps, sampler=args.sampler,
                                               guidance_scale=args.guidance_scale,
                                               aesthetic_scale=args.aesthetic_scale)
    report["model"] = model.identity
    report["prompts"] = "seen combinations" if args.seen else "held-out combinations"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if args.grid:
        write_grid(images, [p.prompt for p in prompts], Path(args.grid))
    adh = report["adherence"]
    print(f"{out}: {report['count']} images, adherence " + ", ".join(f"{k} {v:.3f}" for k, v in adh.items())
          + f"; Fréchet distance {report['frechet_distance']:.2f}; {report['seconds_per_image']:.2f} s/image")
    return 0


def write_grid(images, prompts, path: Path) -> None:
    """A contact sheet of generated images with their prompts (at most 48)."""
    from diffusion.synthetic import encode_png
    from jobs.contact_sheet import render_png

    cells = [({"row_id": f"p{i}", "image_index": 0, "prompt": prompt}, encode_png(image))
             for i, (image, prompt) in enumerate(zip(images[:48], prompts[:48]))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(render_png(cells, thumb=96, columns=8))
