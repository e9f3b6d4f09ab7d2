"""The recipe of the shipped Coop-Diffusion helper models, trained on the tiny model's synthetic data.

    tiny-lowres  the shipped model's latent space (its VAE) at half the side: 32x32 square bucket (bucket scale
                 1/16), one monolithic UNet for every timestep; the low-resolution partner of one-stage
                 super-resolution and the resolution bridge
    tiny-sd15    another latent space: an f=8 VAE (8x8 latents at 64x64 where the shipped model has 16x16), started
                 as an exact 8x8 patch-mean autoencoder and fine-tuned, its own latent scale, one monolithic UNet
    tiny-control tiny-sd15's layout trained to take an image: a layout map of each training image (its foreground,
                 diffusion.control) enters as a fifth UNet input channel, dropped for 10% of rows

Both take their tokenizers and text encoders from the base model (the shipped tiny model by default) and keep them
frozen, so a helper reads a prompt the way the primary does. Each stage writes a model directory and is skipped when
it exists; a stage stopped midway resumes from its last checkpoint (`pangudraw train helpers` again continues).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from diffusion.config import ModelConfig, with_control_channels
from diffusion.training.config import DiffusionTrainConfig, OptimConfig, VAETrainConfig

log = logging.getLogger(__name__)

HELPER_NAMES = ("tiny-lowres", "tiny-sd15", "tiny-control")


def shipped_helper_dir(name: str) -> Path:
    """Where a shipped helper lives in the package (beside the shipped tiny model)."""
    if name not in HELPER_NAMES:
        raise ValueError(f"unknown helper {name!r}; shipped helpers: {', '.join(HELPER_NAMES)}")
    return Path(__file__).resolve().parent.parent / "shipped" / name


def helper_config(name: str, base: ModelConfig) -> ModelConfig:
    """A helper's architecture: the base's text encoders and its texture generator's UNet layout (one UNet,
    monolithic), at its own size or VAE. (The shipped helpers were trained when both of the primary's generators had
    that layout; its structure generator has another since.)"""
    unet = base.texture_unet
    cfg = base.model_copy(update={"name": name, "monolithic": True, "structure_unet": unet, "texture_unet": unet})
    if name == "tiny-lowres":
        return cfg.model_copy(update={"bucket_scales": tuple(s / 2 for s in base.bucket_scales)})
    if name in ("tiny-sd15", "tiny-control"):
        vae = base.vae.model_copy(update={"ch_mult": (*base.vae.ch_mult, base.vae.ch_mult[-1]), "scale_factor": 1.0})
        cfg = cfg.model_copy(update={"vae": vae})
        return with_control_channels(cfg) if name == "tiny-control" else cfg
    raise ValueError(f"unknown helper {name!r}; shipped helpers: {', '.join(HELPER_NAMES)}")


class HelperRecipe(BaseModel):
    """Every setting of the shipped helpers' training; the defaults are what produced the shipped weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Fine-tuning of tiny-sd15's f=8 VAE after its exact patch-mean start; None: the patch-mean start as it is.
    # The shipped model's f=4 VAE moved by 0.02 dB PSNR in 200 fine-tuning steps at 1e-4 (docs/training.md), and the
    # compiled training step of this f=8 VAE made no step in 5 minutes on 2 cores (twice), so the default skips it.
    vae: VAETrainConfig | None = None
    # One UNet over every timestep, text encoders frozen. EMA over ~200 steps: with 0.999 the shipped structure
    # generator's EMA weights trailed its last weights in every attribute but colour.
    unet: DiffusionTrainConfig = DiffusionTrainConfig(
        mode="monolithic", steps=1200, batch_size=32, checkpoint_every=100, log_every=25, ema_decay=0.995,
        train_text_encoders=False, use_low_resolution=True,
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=100),
    )
    model_seed: int = 1


def build_helpers(out_root: str | Path | None, work_dir: str | Path, *, base_model_dir: str | Path | None = None,
                  names: tuple[str, ...] = HELPER_NAMES, recipe: HelperRecipe | None = None,
                  weights_dtype: str | None = None) -> dict:
    """Train (or continue) each named helper into `out_root/<name>` (default: the shipped location).

    The helpers store their weights as `weights_dtype` (default: as the base model does), so that the text encoders
    they share with the base are byte-identical files.
    """
    from diffusion import checkpoints, runtime, synthetic
    from diffusion.model import PanGuDraw, convert_weights, default_model_dir, read_model_manifest
    from diffusion.training.diffusion_trainer import DiffusionTrainer
    from diffusion.training.recipe import TinyModelRecipe, _stage_report, load_synthetic, refit_latent_scale
    from diffusion.training.vae_trainer import VAETrainer, patch_mean_init

    recipe = recipe or HelperRecipe()
    runtime.configure("cpu")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    base_dir = Path(base_model_dir) if base_model_dir is not None else default_model_dir()
    weights_dtype = weights_dtype or read_model_manifest(base_dir).get("weights_dtype", "float32")
    report_path = work / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {"helpers": {}}
    report["recipe"] = json.loads(recipe.model_dump_json())
    report["base_model"] = str(base_dir)

    def save_report():
        report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")

    data_path = work / "data" / "synthetic.parquet"
    if not data_path.is_file():
        t0 = time.perf_counter()
        synthetic.write_parquet(TinyModelRecipe().data, data_path)
        report["data"] = {"seconds": time.perf_counter() - t0, "rows": TinyModelRecipe().data.num_images}
        save_report()
    data = load_synthetic(data_path)
    base = PanGuDraw.load(base_dir, components={"text", "vae"}, batch_invariant=False)

    for name in names:
        out_dir = Path(out_root) / name if out_root is not None else shipped_helper_dir(name)
        if (out_dir / "model.json").is_file() and report["helpers"].get(name, {}).get("unet") is not None:
            log.info("%s: %s exists, skipped", name, out_dir)
            convert_weights(out_dir, weights_dtype)  # nothing is rewritten when already stored so
            continue
        entry = report["helpers"].setdefault(name, {})
        cfg = helper_config(name, base.config)
        start_dir = work / "models" / f"{name}-start"
        if not (start_dir / "model.json").is_file():
            model = PanGuDraw.random(cfg, base.tokenizers, seed=recipe.model_seed, batch_invariant=False)
            names_to_copy = ["text_encoder_1", "text_encoder_2"]
            if cfg.vae == base.config.vae:
                names_to_copy.append("vae")
            for net in names_to_copy:
                checkpoints.load_state(model.nets[net], checkpoints.state_dict(base.nets[net]), source=str(base_dir))
            if "vae" not in names_to_copy:
                t0 = time.perf_counter()
                patch_mean_init(model.nets["vae"])
                rows = []
                if recipe.vae is not None:
                    trainer = VAETrainer(model, data, recipe.vae, work / "runs" / f"{name}-vae")
                    rows = trainer.train()
                    trainer.finish()
                scale, psnr = refit_latent_scale(model, data)
                entry["vae"] = {"seconds": time.perf_counter() - t0, "steps": recipe.vae.steps if recipe.vae else 0,
                                "final_loss": rows[-1]["loss"] if rows else None, "scale_factor": scale,
                                "psnr_db": psnr}
                log.info("%s VAE: scale factor %.5g, PSNR %.2f dB", name, scale, entry["vae"]["psnr_db"])
            model.save(start_dir, description=f"{name} before UNet training", trained=False)
            save_report()
        t0 = time.perf_counter()
        model = PanGuDraw.load(start_dir, batch_invariant=False)
        trainer = DiffusionTrainer(model, data, recipe.unet, work / "runs" / name)
        rows = trainer.train()
        trainer.finish()
        entry["unet"] = _stage_report(trainer, rows, time.perf_counter() - t0)
        model.save(out_dir, description=_describe(name, model.config, recipe, base_dir), trained=True,
                   weights_dtype=weights_dtype)
        entry["out"] = str(out_dir)
        save_report()
        log.info("%s written to %s", name, out_dir)
    return report


def _describe(name: str, cfg: ModelConfig, recipe: HelperRecipe, base_dir: Path) -> str:
    u = recipe.unet
    what = ("the shipped tiny model's latent space at half the side (32x32, bucket scale 1/16)"
            if name == "tiny-lowres" else
            f"its own f=8 VAE (latent scale {cfg.vae.scale_factor:.4g}), 8x8 latents at 64x64")
    if cfg.control_channels:
        what += ("; a control model: the layout map of a control image (its foreground, diffusion.control) is a "
                 "fifth UNet input channel")
    return (f"{name}: a Coop-Diffusion helper trained on the synthetic bilingual data: {what}; one monolithic UNet, "
            f"{u.steps} steps x {u.batch_size}, text encoders and tokenizers of {base_dir.name} (frozen). "
            f"Reproduce with `pangudraw train helpers`.")
