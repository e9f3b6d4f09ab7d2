"""PanGu-Draw's central claim in miniature: time-decoupled structure + texture generators against a monolithic UNet.

Every arm starts from the same trained VAE, tokenizers and untrained text encoders (the `vae` stage of
`pangudraw train tiny`, in WORK/models/vae) and trains on the same synthetic data set (WORK/data/synthetic.parquet).

  decoupled       structure generator (t >= T_s, every image incl. upsampled low-resolution ones, whole latents)
                  + texture generator (t < T_s, 8x8 latent crops of full-resolution images)
  monolithic      one UNet of the same width for every t, whole latents of full-resolution images, trained for
                  as many steps as make the same training compute
  monolithic_2x   the same with twice the UNet width (the inference-side comparison: one big model against two
                  small ones at the same sampling steps)

With --base MODEL (for example the shipped tiny model) every arm instead takes that model's VAE, tokenizers and
trained text encoders, keeps the encoders frozen, and trains fresh UNets only: the arms then differ in nothing but
their UNets, and a frozen-text step costs about half as much, so the same hour buys each arm more UNet training.

Training compute is counted as the UNet's latent pixels processed: images x latent pixels x optimizer steps. The
decoupled arm's count sets the budget; each monolithic arm gets round(budget / (batch x latent pixels)) steps.
Each trained model is evaluated with the attribute classifier on held-out prompts (English, Chinese, mixed; two
aspect ratios): prompt adherence per attribute, the Fréchet distance of classifier features to real images, and
seconds per image, both as the evaluation ran (first compiles included) and warm (interleaved batches of compiled
graphs, the inference-side comparison). JSON out.

    .venv/bin/python benchmarks/time_decoupled.py --work work/pangu-draw-tiny --structure-steps 400 \
        --texture-steps 240 --batch 16 --out benchmarks/results/time_decoupled.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("time_decoupled")


def _arm_report(stages: list[dict]) -> dict:
    return {
        "train_seconds": sum(s["seconds"] for s in stages),
        "unet_latent_pixel_steps": sum(s["unet_latent_pixel_steps"] for s in stages),
        "images_seen": sum(s["images_seen"] for s in stages),
        "stages": stages,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="work/pangu-draw-tiny", help="work directory of `pangudraw train tiny`")
    parser.add_argument("--runs", default=None, help="where the arms train (default: WORK/time_decoupled)")
    parser.add_argument("--base", default=None,
                        help="model directory whose VAE, tokenizers and text encoders every arm takes, the encoders "
                             "frozen (default: WORK/models/vae, encoders untrained and learning)")
    parser.add_argument("--data", default=None, help="training Parquet (default: WORK/data/synthetic.parquet)")
    parser.add_argument("--structure-steps", type=int, default=400)
    parser.add_argument("--texture-steps", type=int, default=240)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--arms", default="decoupled,monolithic,monolithic_2x")
    parser.add_argument("--timing-images", type=int, default=8,
                        help="images per timed batch (64x64, after a warm-up batch that compiles)")
    parser.add_argument("--timing-rounds", type=int, default=3, help="timed batches per arm, interleaved")
    parser.add_argument("--out", default="benchmarks/results/time_decoupled.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from diffusion import evaluation, runtime, synthetic
    from diffusion.config import ModelConfig
    from diffusion.model import PanGuDraw, read_model_manifest
    from diffusion.training.config import DiffusionTrainConfig, OptimConfig
    from diffusion.training.recipe import load_synthetic, train_diffusion_stage

    runtime.configure("cpu")
    work = Path(args.work)
    base = Path(args.base) if args.base else work / "models" / "vae"
    data_path = Path(args.data) if args.data else work / "data" / "synthetic.parquet"
    if not (base / "model.json").is_file():
        parser.error(f"{base} is not a model directory" if args.base else
                     f"{work} has no trained VAE stage; run `pangudraw train tiny --work {work}` first")
    if not data_path.is_file():
        parser.error(f"no training data at {data_path} (`pangudraw train data --out {data_path}` makes it)")
    runs = Path(args.runs) if args.runs else work / "time_decoupled"
    frozen_text = args.base is not None
    data = load_synthetic(data_path)
    base_config = ModelConfig.model_validate(read_model_manifest(base)["config"])
    optim = OptimConfig(learning_rate=args.lr, warmup_steps=50)
    common = dict(batch_size=args.batch, checkpoint_every=100, log_every=50, optim=optim)
    if frozen_text:
        common["train_text_encoders"] = False
    # With a trained base, each generator starts fresh (a model config given to the stage makes a new UNet); the
    # texture stage keeps the structure generator just trained, since its config is unchanged.
    fresh = base_config.model_copy(update={"name": "tiny-decoupled"}) if frozen_text else None
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    report: dict = {
        "benchmark": "time_decoupled", "host": platform.node(), "cpus": os.cpu_count(),
        "settings": vars(args), "arms": {},
    }

    def stage(name, config, start, model_config=None):
        out = runs / name
        if (out / "model.json").is_file() and (out / "stage.json").is_file():
            return json.loads((out / "stage.json").read_text())
        result = train_diffusion_stage(start, data, config, runs / f"{name}.run", out, model_config=model_config,
                                       description=f"time_decoupled benchmark arm stage {name}")
        (out / "stage.json").write_text(json.dumps(result, indent=2) + "\n")
        return result

    # The decoupled arm sets the compute budget.
    s = stage("structure", DiffusionTrainConfig(mode="structure", steps=args.structure_steps, **common), base,
              model_config=fresh)
    t = stage("decoupled", DiffusionTrainConfig(mode="texture", steps=args.texture_steps, crop_latent=8, **common),
              runs / "structure", model_config=fresh)
    report["arms"]["decoupled"] = {**_arm_report([s, t]), "model": str(runs / "decoupled"),
                                   "data_fraction_used": {"structure": s["data"]["fraction_used"],
                                                          "texture": t["data"]["fraction_used"]}}
    budget = s["unet_latent_pixel_steps"] + t["unet_latent_pixel_steps"]
    square_latent_pixels = 16 * 16
    mono_steps = max(1, round(budget / (args.batch * square_latent_pixels)))
    for arm, factor in (("monolithic", 1), ("monolithic_2x", 2)):
        if arm not in arms:
            continue
        unet = base_config.structure_unet.model_copy(
            update={"model_channels": base_config.structure_unet.model_channels * factor})
        cfg = base_config.model_copy(update={"structure_unet": unet, "texture_unet": unet, "monolithic": True,
                                             "name": f"tiny-{arm}"})
        m = stage(arm, DiffusionTrainConfig(mode="monolithic", steps=mono_steps, **common), base, model_config=cfg)
        report["arms"][arm] = {**_arm_report([m]), "model": str(runs / arm),
                               "data_fraction_used": {"monolithic": m["data"]["fraction_used"]}}
    report["budget_unet_latent_pixel_steps"] = budget

    classifier = evaluation.Classifier.load()
    prompts = synthetic.evaluation_prompts(args.prompts)
    # The evaluated models are timed too: loading them again compiles every graph a second time, and with three arms
    # that took this 24 GB machine out of memory.
    models: dict[str, PanGuDraw] = {}
    for arm, entry in report["arms"].items():
        model = models[arm] = PanGuDraw.load(entry["model"])
        n_params = sum(p.size for p in model.nets["structure_unet"].get_parameters())
        if not model.config.monolithic:
            n_params += sum(p.size for p in model.nets["texture_unet"].get_parameters())
        result, _ = evaluation.evaluate_model(model, classifier, prompts, steps=args.sample_steps)
        entry["unet_parameters"] = int(n_params)
        entry["eval"] = {k: result[k] for k in ("adherence", "by_language", "frechet_distance",
                                                 "seconds_per_image", "count", "steps")}
        logger.info("%s: adherence %s, FD %.2f, %.3f s/image", arm, result["adherence"],
                    result["frechet_distance"], result["seconds_per_image"])
    # Time per image with compiled graphs: the eval's figure includes each model's first compiles.
    from diffusion.model import GenerationRequest

    timing_prompts = synthetic.evaluation_prompts(args.timing_images, aspect_buckets=(5,))
    requests = [GenerationRequest(prompt=p.prompt, seed=p.seed, width=64, height=64, steps=args.sample_steps)
                for p in timing_prompts]
    for model in models.values():
        model.generate(requests)
    timings: dict[str, list[float]] = {arm: [] for arm in models}
    for _ in range(args.timing_rounds):
        for arm, model in models.items():
            t0 = time.perf_counter()
            model.generate(requests)
            timings[arm].append((time.perf_counter() - t0) / len(requests))
    for arm, values in timings.items():
        report["arms"][arm]["warm_seconds_per_image"] = sorted(values)[len(values) // 2]
        report["arms"][arm]["warm_seconds_per_image_rounds"] = values
        logger.info("%s: %.3f s/image warm (%d images of 64x64, %d steps, median of %d)", arm,
                    report["arms"][arm]["warm_seconds_per_image"], len(requests), args.sample_steps, len(values))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
