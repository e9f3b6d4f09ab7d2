"""Does the seed or the prompt draw the outline? Foreground masks of generated images compared pairwise.

For held-out prompts at 64x64 (20 Euler steps, the evaluation's guidance), every image's foreground mask
(`diffusion.control.foreground_mask`: pixels far from the border's median colour) is compared by IoU between:
  - same_seed_other_model: the same prompt and seed through model A and model B (--other), two generators trained
    apart;
  - same_seed_other_shape: model A, the same seed, the prompt with another shape word (circle -> star, ...);
  - other_seed: model A, the same prompt, another seed.
If the outline came from the prompt, other_shape would be low and other_seed high; if it came from the noise, the
reverse. Real images give the scale: the same prompt at two random sizes and positions (real_other_draw), and one
scene drawn with the other shape word at the same size and position (real_other_shape: what a model that follows
the shape word would reach at most if the noise fixed size and place). JSON out.

    .venv/bin/python benchmarks/outline_probe.py --other OTHER_MODEL_DIR --count 24
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NEXT_SHAPE = {"circle": "star", "star": "square", "square": "triangle", "triangle": "circle"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model A (default: the shipped tiny model)")
    parser.add_argument("--other", required=True, help="model B, trained apart from A")
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "outline_probe.json"))
    args = parser.parse_args()

    from diffusion import evaluation, runtime, synthetic
    from diffusion.control import foreground_mask
    from diffusion.model import GenerationRequest, PanGuDraw

    runtime.configure("cpu")
    model_a = PanGuDraw.load(args.model)
    model_b = PanGuDraw.load(args.other)
    prompts = synthetic.evaluation_prompts(args.count, aspect_buckets=(5,))

    def masks(model, items):
        requests = [GenerationRequest(prompt=text, seed=seed, width=64, height=64, steps=args.steps)
                    for text, seed in items]
        return [foreground_mask(np.asarray(img)) for img in model.generate(requests)]

    same = [(p.prompt, p.seed) for p in prompts]
    other_shape = [(synthetic.caption_for(NEXT_SHAPE[p.shape], p.colour, p.background, p.pattern, p.language,
                                          seed=p.seed), p.seed) for p in prompts]
    other_seed = [(p.prompt, p.seed + 1000) for p in prompts]
    a, b = masks(model_a, same), masks(model_b, same)
    a_shape, a_seed = masks(model_a, other_shape), masks(model_a, other_seed)
    real_1 = [foreground_mask(im) for im in evaluation.real_images_for(prompts, seed=1)]
    real_2 = [foreground_mask(im) for im in evaluation.real_images_for(prompts, seed=2)]
    real_shape = [foreground_mask(synthetic.render(dataclasses.replace(scene, shape=NEXT_SHAPE[scene.shape])))
                  for scene in evaluation.real_scenes_for(prompts, seed=1)]

    def mean_iou(xs, ys):
        return round(float(np.mean([evaluation.mask_iou(x, y) for x, y in zip(xs, ys)])), 3)

    result = {
        "benchmark": "outline_probe",
        "model_a": args.model or "shipped pangu-draw-tiny",
        "model_b": args.other,
        "count": len(prompts), "steps": args.steps, "size": "64x64",
        "mean_foreground_iou": {
            "same_seed_other_model": mean_iou(a, b),
            "same_seed_other_shape": mean_iou(a, a_shape),
            "other_seed": mean_iou(a, a_seed),
            "real_other_draw": mean_iou(real_1, real_2),
            "real_other_shape": mean_iou(real_1, real_shape),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
