"""`pangudraw train ...`: the synthetic data set, the shipped tiny model's recipe, and single training stages.

    pangudraw train tiny                      # reproduce the shipped tiny model (data, VAE, structure, texture,
                                              # final structure)
    pangudraw train helpers                   # reproduce the shipped Coop-Diffusion helpers (tiny-lowres, tiny-sd15,
                                              # tiny-control)
    pangudraw train data --out data.parquet   # the synthetic bilingual data set alone
    pangudraw train unet --mode structure --data data.parquet --model BASE_DIR --out OUT_DIR --steps 1200
    pangudraw train vae --data s3://bucket/data/ --model BASE_DIR --out OUT_DIR

Every training command resumes from the last checkpoint in its run directory when it is run again.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from diffusion.config import UNET_LAYOUT_FIELDS
from schemas.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_WORK_DIR = "work/pangu-draw-tiny"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train models (time-decoupled structure/texture generators, VAE, tiny model)")
    tsub = p.add_subparsers(dest="train_command", metavar="WHAT", required=True)

    tiny = tsub.add_parser("tiny", help="reproduce the shipped tiny bilingual model from scratch")
    tiny.add_argument("--out", default=None,
                      help="model directory to write (default: diffusion/shipped/pangu-draw-tiny in this checkout)")
    tiny.add_argument("--work", default=DEFAULT_WORK_DIR,
                      help="data, checkpoints and report (default: %(default)s); running again continues from it")
    tiny.add_argument("--images", type=int, default=None, help="synthetic images (default: the recipe's 6000)")
    tiny.add_argument("--text-stage", action="store_true",
                      help="the variant with a contrastive text-encoder stage and frozen encoders "
                           "(docs/training.md measures it)")
    tiny.add_argument("--scale", type=float, default=1.0,
                      help="multiply every stage's steps by this (a quick look: 0.1)")
    tiny.add_argument("--weights-dtype", choices=["float16", "float32"], default="float16",
                      help="how the written model stores its weights (default: %(default)s, as the shipped model; "
                           "training and its checkpoints are float32 either way)")
    tiny.set_defaults(func=run_tiny)

    helpers = tsub.add_parser("helpers", help="reproduce the shipped Coop-Diffusion helper models "
                                              "(tiny-lowres, tiny-sd15, tiny-control) on the tiny model's text encoders")
    helpers.add_argument("--out", default=None,
                         help="folder to write the helpers' model directories into (default: diffusion/shipped/ in "
                              "this checkout)")
    helpers.add_argument("--work", default="work/helpers",
                         help="data, checkpoints and report (default: %(default)s); running again continues from it")
    helpers.add_argument("--base", default=None,
                         help="model directory whose tokenizers, text encoders (and VAE, for tiny-lowres) the "
                              "helpers use (default: the shipped tiny model)")
    helpers.add_argument("--only", choices=["tiny-lowres", "tiny-sd15", "tiny-control"], action="append", default=None,
                         help="train only this helper (may be repeated)")
    helpers.add_argument("--scale", type=float, default=1.0,
                         help="multiply every stage's steps by this (a quick look: 0.1)")
    helpers.add_argument("--weights-dtype", choices=["float16", "float32"], default=None,
                         help="how the written helpers store their weights (default: as the base model does)")
    helpers.set_defaults(func=run_helpers)

    data = tsub.add_parser("data", help="write the synthetic bilingual data set as Parquet")
    data.add_argument("--out", required=True, help="Parquet file to write")
    data.add_argument("--images", type=int, default=6000)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--low-resolution-fraction", type=float, default=0.4)
    data.add_argument("--include-heldout", action="store_true",
                      help="also draw the held-out attribute combinations (kept out of training sets by default)")
    data.set_defaults(func=run_data)

    for name, helptext in (("unet", "train one UNet: structure (t >= T_s), texture (t < T_s) or monolithic"),
                           ("vae", "train the KL autoencoder"),
                           ("text", "pre-train both text encoders contrastively against the images (CLIP-style)")):
        s = tsub.add_parser(name, help=helptext)
        s.add_argument("--data", required=True, action="append",
                       help="Parquet file or prefix (local path, file:// or s3://) of image bytes and captions; "
                            "may be repeated")
        s.add_argument("--model", required=True, help="model directory to start from")
        s.add_argument("--out", required=True, help="model directory to write")
        s.add_argument("--run-dir", default=None, help="checkpoints and metrics (default: OUT.run)")
        s.add_argument("--steps", type=int, default=1000)
        s.add_argument("--batch-size", type=int, default=128 if name == "text" else 32)
        s.add_argument("--grad-accum", type=int, default=1)
        s.add_argument("--lr", type=float, default=1e-3)
        s.add_argument("--warmup", type=int, default=100)
        s.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                       help="after the warm-up: constant, or cosine decay to 0 at the last step")
        s.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
        s.add_argument("--ema-decay", type=float, default=0.99 if name == "text" else 0.999)
        s.add_argument("--checkpoint-every", type=int, default=200)
        s.add_argument("--seed", type=int, default=0)
        if name == "unet":
            s.add_argument("--mode", required=True, choices=["structure", "texture", "monolithic"])
            s.add_argument("--crop-latent", type=int, default=None,
                           help="texture: square latent crops of this side (default 8)")
            s.add_argument("--width", type=int, default=None,
                           help="start a fresh UNet of this model_channels (monolithic comparisons); default: keep")
            s.add_argument("--prediction", default=None, choices=["epsilon", "v"],
                           help="what the UNet outputs; another than the base model's starts a fresh UNet")
            s.add_argument("--position-channels", default=None, choices=["on", "off"],
                           help="give the UNet each latent pixel's position as two more input channels; another "
                                "setting than the base model's starts a fresh UNet")
            s.add_argument("--scale-shift-norm", default=None, choices=["on", "off"],
                           help="ResBlocks take a scale and shift from the time/label embedding (FiLM); another "
                                "setting than the base model's starts a fresh UNet")
            s.add_argument("--unet", action="append", default=[], metavar="FIELD=VALUE",
                           help="a layout setting of the trained generator's UNet (" + ", ".join(UNET_LAYOUT_FIELDS)
                                + "; VALUE as JSON, e.g. model_channels=64 or channel_mult=[1,2]); may be repeated; "
                                  "another value than the base model's starts a fresh UNet, the other generator "
                                  "is kept")
            s.add_argument("--loss-weighting", default="epsilon", choices=["epsilon", "truncated_snr"],
                           help="per-sample weights of the loss (truncated_snr: max(1, 1/SNR))")
            s.add_argument("--full-resolution-only", action="store_true",
                           help="structure: leave out the low-resolution images (by default it uses them upsampled)")
            s.add_argument("--freeze-text", action="store_true",
                           help="keep the text encoders fixed (default: structure and monolithic train them)")
        s.set_defaults(func=run_stage, stage=name)


def _changed_model_config(args: argparse.Namespace, base_config):
    """The model config `train unet` trains, when its flags change a UNet's layout (a fresh UNet); else None."""
    model_config = None
    wants_monolithic = args.mode == "monolithic"
    trained = "texture_unet" if args.mode == "texture" else "structure_unet"
    # Settings that make a fresh UNet when they differ from the base model's.
    changes = {}
    if args.prediction is not None:
        changes["prediction"] = args.prediction
    for flag in ("position_channels", "scale_shift_norm"):
        if getattr(args, flag) is not None:
            changes[flag] = getattr(args, flag) == "on"
    current = getattr(base_config, trained)
    changes.update(_unet_settings(args.unet, current))
    changed = any(getattr(current, k) != v for k, v in changes.items())
    if args.width is not None or wants_monolithic != base_config.monolithic:
        unet = base_config.structure_unet
        if args.width is not None:
            unet = unet.model_copy(update={"model_channels": args.width})
        unet = unet.model_copy(update=changes)
        model_config = base_config.model_copy(update={
            "structure_unet": unet, "texture_unet": unet, "monolithic": wants_monolithic})
    elif changed:
        # A fresh UNet of the new settings; the other generator and everything else stay as they are.
        model_config = base_config.model_copy(update={trained: current.model_copy(update=changes)})
    return model_config


def _unet_settings(items: list[str], current) -> dict:
    """`--unet FIELD=VALUE` items as UNetConfig updates, checked against the config they would make."""
    from pydantic import ValidationError

    changes = {}
    for item in items:
        field, sep, text = item.partition("=")
        field = field.strip()
        if not sep or not text.strip():
            raise UserError(f"--unet {item!r}: expected FIELD=VALUE, for example model_channels=64")
        if field not in UNET_LAYOUT_FIELDS:
            raise UserError(f"--unet {item!r}: {field!r} is not a layout setting; expected one of "
                            + ", ".join(UNET_LAYOUT_FIELDS))
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise UserError(f"--unet {item!r}: the value {text!r} is not JSON (a number, or a list such as [1,2])") from None
        changes[field] = value
    if changes:
        try:
            checked = type(current).model_validate({**current.model_dump(), **changes})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'layout'}: {e['msg']}" for e in exc.errors())
            raise UserError(f"--unet {' '.join(items)}: not a valid UNet layout ({problems})") from None
        changes = {k: getattr(checked, k) for k in changes}
    return changes


def _read_training_data(uris: list[str]):
    from diffusion.training.data import ImageTextSet, read_tables
    from storage import StorageError, open_store, read_uri

    sources = []
    for uri in uris:
        try:
            if uri.endswith(".parquet"):
                sources.append(read_uri(uri))
                continue
            store = open_store(uri)
            keys = sorted(k for k in store.list("") if k.endswith(".parquet"))
        except (StorageError, OSError) as exc:
            raise UserError(f"--data {uri}: cannot read it ({exc})") from None
        if not keys:
            raise UserError(f"--data {uri}: no .parquet files under this prefix")
        sources.extend(store.get(k) for k in keys)
    try:
        data = ImageTextSet.from_table(read_tables(sources))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken file is the user's to fix
        raise UserError(f"--data {', '.join(uris)}: not usable training data ({exc})") from None
    log.info("training data: %d images from %s", len(data), ", ".join(uris))
    return data


def run_data(args: argparse.Namespace) -> int:
    from diffusion import synthetic

    cfg = synthetic.SyntheticConfig(num_images=args.images, seed=args.seed,
                                    low_resolution_fraction=args.low_resolution_fraction,
                                    include_heldout=args.include_heldout)
    t0 = time.perf_counter()
    path = synthetic.write_parquet(cfg, args.out)
    print(f"{path}: {args.images} synthetic images (seed {args.seed}) in {time.perf_counter() - t0:.1f} s")
    return 0


def _scale_stages(recipe, stages: tuple[str, ...], scale: float):
    """The recipe with each named stage's steps multiplied by `scale` (at least 1; checkpoints and logs follow)."""
    updates = {}
    for stage in stages:
        cfg = getattr(recipe, stage)
        if cfg is None:
            continue
        steps = max(1, int(round(cfg.steps * scale)))
        updates[stage] = cfg.model_copy(update={
            "steps": steps, "checkpoint_every": max(1, min(cfg.checkpoint_every, steps)),
            "log_every": max(1, min(cfg.log_every, steps // 5 or 1))})
    return recipe.model_copy(update=updates)


def run_tiny(args: argparse.Namespace) -> int:
    from diffusion import synthetic
    from diffusion.training.recipe import TinyModelRecipe, build_tiny_model, contrastive_text_recipe, shipped_model_dir

    recipe = contrastive_text_recipe() if args.text_stage else TinyModelRecipe()
    if args.images is not None:
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"num_images": args.images})})
    if args.scale != 1.0:
        if args.scale <= 0:
            raise UserError("--scale must be above 0")
        recipe = _scale_stages(recipe, ("vae", "text", "structure", "texture", "final_structure"), args.scale)
    out = Path(args.out) if args.out else shipped_model_dir()
    report = build_tiny_model(out, args.work, recipe, weights_dtype=args.weights_dtype)
    stages = report["stages"]
    print(f"{out}: tiny model written ({synthetic.__name__} data, work files in {args.work})")
    for name in ("data", "vae", "text", "structure", "texture", "final_structure"):
        if name in stages:
            print(f"  {name:15s} {stages[name]['seconds']:7.1f} s")
    weights = report["weights"]
    print(f"  weights stored as {weights['weights_dtype']}: {weights['bytes_after'] / 2**20:.1f} MB")
    return 0


def run_helpers(args: argparse.Namespace) -> int:
    from diffusion.training.helpers import HELPER_NAMES, HelperRecipe, build_helpers

    recipe = HelperRecipe()
    if args.scale != 1.0:
        if args.scale <= 0:
            raise UserError("--scale must be above 0")
        recipe = _scale_stages(recipe, ("vae", "unet"), args.scale)
    if args.base is not None and not (Path(args.base) / "model.json").is_file():
        raise UserError(f"--base {args.base}: not a model directory (no model.json)")
    names = tuple(args.only) if args.only else HELPER_NAMES
    report = build_helpers(args.out, args.work, base_model_dir=args.base, names=names, recipe=recipe,
                           weights_dtype=args.weights_dtype)
    for name in names:
        entry = report["helpers"].get(name, {})
        secs = sum(entry[k]["seconds"] for k in ("vae", "unet") if k in entry)
        print(f"{entry.get('out', name)}: {name} written ({secs:.1f} s of training)")
    return 0


def run_stage(args: argparse.Namespace) -> int:
    from diffusion import runtime
    from diffusion.config import ModelConfig
    from diffusion.model import read_model_manifest
    from diffusion.training.config import DiffusionTrainConfig, OptimConfig, TextTrainConfig, VAETrainConfig
    from diffusion.training.recipe import train_diffusion_stage, train_text_stage, train_vae_stage

    runtime.configure("cpu")
    if args.steps < 1 or args.batch_size < 1 or args.grad_accum < 1:
        raise UserError("--steps, --batch-size and --grad-accum must be at least 1")
    if not (0.0 <= args.ema_decay < 1.0):
        raise UserError("--ema-decay must be in [0, 1)")
    model_dir = Path(args.model)
    base = read_model_manifest(model_dir)
    # The UNet settings are checked before the data are read, so a mistake there costs nothing.
    model_config = _changed_model_config(args, ModelConfig.model_validate(base["config"])) \
        if args.stage == "unet" else None
    data = _read_training_data(args.data)
    run_dir = Path(args.run_dir) if args.run_dir else Path(str(args.out).rstrip("/") + ".run")
    common = dict(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed,
                  precision=args.precision, ema_decay=args.ema_decay, checkpoint_every=args.checkpoint_every,
                  optim=OptimConfig(learning_rate=args.lr, warmup_steps=args.warmup, schedule=args.lr_schedule))
    if args.stage == "vae":
        report = train_vae_stage(model_dir, data, VAETrainConfig(**common), run_dir, args.out)
    elif args.stage == "text":
        if args.batch_size < 2:
            raise UserError("--batch-size must be at least 2: each caption is told apart from the batch's others")
        if args.batch_size > len(data):
            raise UserError(f"--batch-size {args.batch_size} is more than the {len(data)} training images")
        report = train_text_stage(model_dir, data, TextTrainConfig(**common), run_dir, args.out)
    else:
        config = DiffusionTrainConfig(mode=args.mode, crop_latent=args.crop_latent,
                                      loss_weighting=args.loss_weighting,
                                      train_text_encoders=False if args.freeze_text else None,
                                      use_low_resolution=False if args.full_resolution_only else None, **common)
        report = train_diffusion_stage(model_dir, data, config, run_dir, args.out, model_config=model_config,
                                       seed=args.seed)
    (Path(args.out) / "training.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"{args.out}: {args.stage} trained for {report['steps']} steps, final loss {report['final_loss']:.4f}, "
          f"{report['seconds']:.0f} s (checkpoints in {run_dir})")
    return 0
