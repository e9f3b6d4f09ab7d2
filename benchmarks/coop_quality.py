"""What Coop-Diffusion does to the images of trained models: layout kept by one-stage super-resolution, and control
plus prompt under latent bridging, with the attribute classifier and direct pixel measures (JSON out).

Super-resolution: the 32x32 model (tiny-lowres) draws each held-out prompt alone (L); one-stage super-resolution
hands its x0 at t_switch to the 64x64 primary (S); the primary also samples every step at full size from the same
seed (P). Layout kept = how well S matches L: Pearson correlation of 8x8 grey thumbnails, and how often the
classifier reads the same colour, background and shape on S as on L (upsampled); P against L is the baseline of an
image that did not start from L. Cost: seconds per image of S and of P, one after the other in this run, after an
untimed pass of each at the same batches (graphs compile per batch shape). The control arms' times include their
first compilations.

Control: each prompt gets a layout sketch (the prompt's shape in grey on black at a random size and position,
`evaluation.layout_sketch`). A helper sees the sketch through its input latents (a control helper) and joins the
primary over a window of early steps with a weight: tiny-sd15 (another latent space) and tiny-lowres (the primary's
latent space at 32x32). tiny-control (tiny-sd15's layout, trained to take the image) reads the sketch's layout map
as an input channel instead (diffusion.control) and keeps the row's guidance. Arms: the primary alone, each helper alone (weight 1, every step), and fused settings.
Control followed = IoU of the image's foreground (pixels far from its border colour) with the sketch's shape, and
the classifier's shape against the sketch's; prompt followed = classifier colour, background and pattern; both
together (`control_and_prompt`) = the share of images with IoU >= 0.5 and the prompt's colour and background.

    python benchmarks/coop_quality.py                       # shipped primary, shipped helpers, 24 prompts
    python benchmarks/coop_quality.py --count 48 --steps 20 --out benchmarks/results/coop_quality.json
    python benchmarks/coop_quality.py --parts control --control-helpers tiny-control --bridge "" \
        --out benchmarks/results/coop_quality_control_model.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

def thumb_correlation(a, b) -> list[float]:
    from diffusion.evaluation import thumbnail_correlation

    return [thumbnail_correlation(x, y) for x, y in zip(a, b)]


def agreement(a: dict, b: dict, heads=("shape", "colour", "background", "pattern")) -> dict:
    return {h: float(np.mean([x == y for x, y in zip(a[h], b[h])])) for h in heads}


def requests_for(model, prompts, steps, guidance, aesthetic):
    from diffusion import buckets
    from diffusion.model import GenerationRequest

    out = []
    for p in prompts:
        w, h = buckets.bucket_sizes(model.config.bucket_scales[0])[p.aspect_bucket]
        out.append(GenerationRequest(prompt=p.prompt, seed=p.seed, width=w, height=h, steps=steps,
                                     guidance_scale=guidance, aesthetic_scale=aesthetic))
    return out


JOINT_IOU = 0.5


def by_shape(requests, fn):
    """Run fn(batch_indices) per group of rows of one size; returns a list in request order."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault((r.width, r.height), []).append(i)
    out = [None] * len(requests)
    for idx in groups.values():
        for i, v in zip(idx, fn(idx)):
            out[i] = v
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--primary", help="64x64 primary model directory (default: the shipped tiny model)")
    parser.add_argument("--low", help="32x32 model directory (default: the shipped tiny-lowres)")
    parser.add_argument("--other", help="model with another latent space (default: the shipped tiny-sd15)")
    parser.add_argument("--classifier", help="attribute classifier directory (default: the shipped one)")
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--t-switch", type=int, default=500)
    parser.add_argument("--guidance-scale", type=float, default=6.0)
    parser.add_argument("--aesthetic-scale", type=float, default=4.0)
    parser.add_argument("--fused", default="0.5:0:0.5,0.8:0:0.3,0.8:0:0.5,1:0:1:1,0.8:0:0.3:1,0.8:0:0.5:1",
                        help="control settings WEIGHT:START:END[:HELPER_GUIDANCE], comma separated (the helper's "
                             "guidance scale defaults to the row's)")
    parser.add_argument("--bridge", default="0.5:0:1,0.8:0:0.5,1:0:0.5",
                        help="plain latent-bridge settings with tiny-sd15 and no control, WEIGHT:START:END[:GUIDANCE]")
    parser.add_argument("--control-helpers", default="tiny-sd15,tiny-lowres,tiny-control",
                        help="helpers that take the control arms, comma separated")
    parser.add_argument("--control-model", help="model trained to take the control image (default: the shipped "
                                                "tiny-control)")
    parser.add_argument("--control-model-fused", default="0.5:0:1,0.8:0:0.3,0.8:0:0.5,0.5:0:0.5,1:0:0.3",
                        help="settings of the control model's arms WEIGHT:START:END[:HELPER_GUIDANCE] (it reads the "
                             "image as an input, so it keeps the row's guidance by default)")
    parser.add_argument("--parts", default="super_resolution,control",
                        help="which parts to run, comma separated (super_resolution, control)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "coop_quality.json"))
    parser.add_argument("--grid", help="also write a contact sheet (PNG) of the sketches and every arm")
    args = parser.parse_args(argv)

    from diffusion import coop, evaluation, runtime, synthetic
    from diffusion.model import PanGuDraw, default_model_dir
    from diffusion.training.helpers import shipped_helper_dir

    runtime.configure("cpu")
    primary = PanGuDraw.load(args.primary or default_model_dir(), batch_invariant=False)
    low = PanGuDraw.load(args.low or shipped_helper_dir("tiny-lowres"), batch_invariant=False)
    other = PanGuDraw.load(args.other or shipped_helper_dir("tiny-sd15"), batch_invariant=False)
    parts = set(args.parts.split(","))
    control_model = None
    if "tiny-control" in args.control_helpers.split(","):
        control_model = PanGuDraw.load(args.control_model or shipped_helper_dir("tiny-control"), batch_invariant=False)
    clf = evaluation.Classifier.load(args.classifier)
    prompts = synthetic.evaluation_prompts(args.count)
    targets = [asdict(p) for p in prompts]
    req_hi = requests_for(primary, prompts, args.steps, args.guidance_scale, args.aesthetic_scale)
    req_lo = requests_for(low, prompts, args.steps, args.guidance_scale, args.aesthetic_scale)
    seconds: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
        return out

    # ---------------------------------------------------------------- super-resolution
    n = len(prompts)
    sr_report = None
    if "super_resolution" in parts:
        def sr_batch(idx):
            return list(primary.decode(coop.super_resolve(low, primary, [req_lo[i] for i in idx], args.t_switch)))

        # Graphs compile per batch shape: one untimed pass of each at the timed batches, then the timed pass.
        low.generate(req_lo), by_shape(req_lo, sr_batch), primary.generate(req_hi)
        low_imgs = timed("low_plain", lambda: low.generate(req_lo))
        sr_imgs = timed("super_resolution", lambda: by_shape(req_lo, sr_batch))
        hi_imgs = timed("primary_plain", lambda: primary.generate(req_hi))
        low_up = by_shape(req_hi, lambda idx: evaluation.resize_images(
            [low_imgs[i] for i in idx], (req_hi[idx[0]].height, req_hi[idx[0]].width)))
        pred = {k: clf.predict(v) for k, v in (("low", low_up), ("sr", sr_imgs), ("plain", hi_imgs))}
        sr_report = {
            "t_switch": args.t_switch,
            "seconds_per_image": {"super_resolution": seconds["super_resolution"] / n,
                                  "primary_plain_full_size": seconds["primary_plain"] / n,
                                  "low_plain": seconds["low_plain"] / n},
            "cost_ratio_sr_over_plain": seconds["super_resolution"] / seconds["primary_plain"],
            "thumbnail_correlation_with_low_image": {
                "super_resolution": float(np.mean(thumb_correlation(sr_imgs, low_up))),
                "primary_plain_same_seed": float(np.mean(thumb_correlation(hi_imgs, low_up))),
            },
            "classifier_agreement_with_low_image": {
                "super_resolution": agreement(pred["sr"], pred["low"]),
                "primary_plain_same_seed": agreement(pred["plain"], pred["low"]),
            },
            "adherence": {k: evaluation.adherence(v, targets) for k, v in pred.items()},
        }
        print(json.dumps({"super_resolution": sr_report}, indent=1))

    # ---------------------------------------------------------------- control through a latent bridge
    sketches = [evaluation.layout_sketch(p.shape, r.width, r.height, seed=p.seed + 777)
                for p, r in zip(prompts, req_hi)]
    arms = {"primary_alone": (None, 0.0, 0.0, 1.0, None, False)}
    for spec in filter(None, args.bridge.split(",")):
        w, a, b, *g = (float(v) for v in spec.split(":"))
        name = f"bridge_tiny-sd15_w{w:g}_window{a:g}-{b:g}" + (f"_guidance{g[0]:g}" if g else "")
        arms[name] = (other, w, a, b, g[0] if g else None, False)
    for helper_name in args.control_helpers.split(","):
        if "control" not in parts:
            break
        helper_model = {"tiny-sd15": other, "tiny-lowres": low, "tiny-control": control_model}[helper_name]
        arms[f"{helper_name}_alone"] = (helper_model, 1.0, 0.0, 1.0, None, True)
        specs = args.control_model_fused if helper_model.config.control_channels else args.fused
        for spec in filter(None, specs.split(",")):
            w, a, b, *g = (float(v) for v in spec.split(":"))
            name = f"{helper_name}_w{w:g}_window{a:g}-{b:g}" + (f"_guidance{g[0]:g}" if g else "")
            arms[name] = (helper_model, w, a, b, g[0] if g else None, True)

    def control_batch(helper_model, weight, window, guidance, control):
        def run(idx):
            if helper_model is None:
                return primary.generate([req_hi[i] for i in idx])
            helper = coop.CoopHelper(helper_model, weight=weight, window=window, guidance_scale=guidance,
                                     control_image=np.stack([sketches[i][0] for i in idx]) if control else None)
            return list(primary.decode(coop.coop_generate(primary, [req_hi[i] for i in idx], [helper])))
        return run

    control_report: dict[str, dict] = {}
    arm_images = {}
    for name, (helper_model, w, a, b, g, control) in arms.items():
        imgs = timed(name, lambda: by_shape(req_hi, control_batch(helper_model, w, (a, b), g, control)))
        arm_images[name] = imgs
        p = clf.predict(imgs)
        ious = [evaluation.mask_iou(evaluation.foreground_mask(img), mask)
                for img, (_, mask) in zip(imgs, sketches)]
        # Prompt and control together, per image: the shape on the sketch (IoU >= 0.5) in the prompt's colour on
        # the prompt's background.
        joint = [iou >= JOINT_IOU and p["colour"][i] == t["colour"] and p["background"][i] == t["background"]
                 for i, (iou, t) in enumerate(zip(ious, targets))]
        control_report[name] = {
            "helper": None if helper_model is None else helper_model.config.name, "weight": w, "window": [a, b],
            "helper_guidance_scale": g, "control_image": control,
            "seconds_per_image": seconds[name] / n,
            "control_iou": float(np.mean(ious)),
            "control_iou_at_least_0.5": float(np.mean([iou >= JOINT_IOU for iou in ious])),
            "control_and_prompt": float(np.mean(joint)),
            "control_shape_accuracy": evaluation.adherence(p, targets)["shape"],
            "prompt_adherence": {k: v for k, v in evaluation.adherence(p, targets).items() if k != "shape"},
        }
        print(name, json.dumps(control_report[name]))
    sketch_fg = [evaluation.mask_iou(evaluation.foreground_mask(s), m) for s, m in sketches]

    report = {
        "benchmark": "coop_quality",
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "models": {"primary": str(args.primary or default_model_dir()),
                   "low": str(args.low or shipped_helper_dir("tiny-lowres")),
                   "other": str(args.other or shipped_helper_dir("tiny-sd15")),
                   "control": None if control_model is None else str(args.control_model
                                                                     or shipped_helper_dir("tiny-control")),
                   "identities": {"primary": primary.identity, "low": low.identity, "other": other.identity,
                                  "control": None if control_model is None else control_model.identity}},
        "prompts": {"count": n, "heldout": True, "steps": args.steps, "guidance_scale": args.guidance_scale,
                    "aesthetic_scale": args.aesthetic_scale},
        "super_resolution": sr_report,
        "control": {"sketch": {"foreground_rgb": evaluation.SKETCH_FOREGROUND,
                               "background_rgb": evaluation.SKETCH_BACKGROUND,
                               "foreground_distance": evaluation.FOREGROUND_DISTANCE,
                               "iou_of_sketch_with_itself": float(np.mean(sketch_fg))},
                    "arms": control_report},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print("wrote", args.out)
    if args.grid:
        from PIL import Image

        columns = [("sketch", [s for s, _ in sketches])]
        if sr_report is not None:
            columns += [("low", low_up), ("super-res", sr_imgs), ("plain", hi_imgs)]
        columns += list(arm_images.items())
        cell = 84
        sheet = Image.new("RGB", (cell * len(columns), cell * n), (255, 255, 255))
        for c, (_, imgs) in enumerate(columns):
            for r, img in enumerate(imgs):
                sheet.paste(Image.fromarray(img), (c * cell + (cell - img.shape[1]) // 2,
                                                   r * cell + (cell - img.shape[0]) // 2))
        sheet.save(args.grid)
        print("wrote", args.grid, "columns:", ", ".join(name for name, _ in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
