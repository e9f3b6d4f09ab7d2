"""The recipe of the shipped tiny model, from nothing to a model directory, resumable stage by stage.

    data        synthetic bilingual data set (diffusion.synthetic) -> work/data/synthetic.parquet
    tokenizers  WordPiece and CLIP BPE vocabularies of the captions' words -> work/tokenizers/
    vae         the KL autoencoder on 32x32 crops, then its latent scale factor -> work/models/vae/
    structure   structure generator + both text encoders, t in [T_s, T), all images -> work/models/structure/
    texture     texture generator, t in [0, T_s), 8x8 latent crops of full-resolution images -> work/models/texture/
    final_structure
                the structure generator that ships: a fresh one of the `structure_unet` layout (patch 2, 64
                channels), trained against the text encoders of the structure stage, frozen -> out_dir

Without `final_structure` the texture stage writes out_dir and the first structure generator ships.

With `TinyModelRecipe.text` set (e.g. `CONTRASTIVE_TEXT`) a text stage pre-trains both encoders contrastively
against the images (text_trainer) -> work/models/text/, and the generators then keep them frozen. The two
generators depend only on the VAE and the text encoders, not on each other (time-decoupled training), so that
variant trains the texture generator first -> work/models/texture/ and the longer structure stage last -> out_dir:
any structure checkpoint can be sampled with the finished texture generator.

A stage whose model directory exists is skipped, and a stage stopped midway resumes from its last checkpoint, so
running the same command again continues; a work directory made with other settings is refused.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from diffusion import synthetic
from diffusion.config import ModelConfig, tiny_config
from diffusion.training.config import DiffusionTrainConfig, OptimConfig, TextTrainConfig, VAETrainConfig
from diffusion.training.data import ImageTextSet, bucket_images, read_tables
from schemas.errors import UserError

log = logging.getLogger(__name__)

SHIPPED_NAME = "pangu-draw-tiny"


def shipped_model_dir() -> Path:
    """Where the shipped tiny model lives in the package (`diffusion.model.default_model_dir` looks there)."""
    return Path(__file__).resolve().parent.parent / "shipped" / SHIPPED_NAME


def shipped_tiny_config(name: str = SHIPPED_NAME, *, model_channels: int = 32, monolithic: bool = False) -> ModelConfig:
    """The shipped model's architecture: the tiny test preset (64x64 at bucket scale 1/8, f=4 VAE, 2-level UNet)
    with vocabularies big enough for the synthetic captions (WordPiece 256, CLIP BPE 512), and a VAE without norms
    or mid attention, which `patch_mean_init` starts as an exact 4x4 patch-mean autoencoder. With GroupNorm (8
    groups of 2 channels, or one group) and a random start, 200-400 steps on 2 cores gave back the shapes in two or
    three colours (PSNR 11-14 dB); the patch-mean start is 23.7 dB before any step."""
    config = tiny_config(name, model_channels=model_channels, vocab_1=256, vocab_2=512, monolithic=monolithic)
    return config.model_copy(update={"vae": config.vae.model_copy(update={"norm_groups": 0, "mid_attention": False})})


# The text stage as measured in docs/training.md ("A contrastive text stage"): 400 steps x 128 images.
CONTRASTIVE_TEXT = TextTrainConfig(steps=400, batch_size=128, ema_decay=0.99, checkpoint_every=100, log_every=25,
                                   optim=OptimConfig(learning_rate=1e-3, warmup_steps=50))


class TinyModelRecipe(BaseModel):
    """Every setting of the shipped model's training; the defaults are what produced the shipped weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: synthetic.SyntheticConfig = synthetic.SyntheticConfig(num_images=6000, seed=0)
    vae: VAETrainConfig = VAETrainConfig(
        steps=100, batch_size=16, crop=32, checkpoint_every=50, log_every=25,
        optim=OptimConfig(learning_rate=1e-4, warmup_steps=20),
    )
    # Contrastive pre-training of both text encoders (`CONTRASTIVE_TEXT`), or None: the structure stage trains them.
    text: TextTrainConfig | None = None
    structure: DiffusionTrainConfig = DiffusionTrainConfig(
        mode="structure", steps=1600, batch_size=32, checkpoint_every=100, log_every=25,
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=100),
    )
    texture: DiffusionTrainConfig = DiffusionTrainConfig(
        mode="texture", steps=600, batch_size=32, crop_latent=8, checkpoint_every=100, log_every=25,
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=100),
    )
    # What the structure generator predicts (the texture generator predicts epsilon).
    structure_prediction: Literal["epsilon", "v"] = "epsilon"
    # Layout settings of the structure generator's UNet over the shipped ones (`UNetConfig` fields, as
    # `pangudraw train unet --unet FIELD=VALUE` takes them), e.g. {"patch_size": 2, "model_channels": 64}.
    # With `final_structure` they are the layout of that last, shipped structure generator; the first one keeps the
    # shipped layout. docs/training.md "Depth, a warm start, a coarser grid": patch 2 doubled the shapes read.
    structure_unet: dict[str, Any] = {"patch_size": 2, "model_channels": 64}
    # Without a text stage: which generator's loss trains the two text encoders ("structure": the structure
    # generator, trained first; "texture": the texture generator, trained first, then the structure generator
    # with the encoders frozen, the cheaper step).
    text_learns_in: Literal["structure", "texture"] = "structure"
    # After the structure and texture stages: a fresh structure generator of layout `structure_unet` trained against
    # the frozen text encoders, which replaces the first one (None: the first one ships). Only with the text
    # encoders learning in the structure stage; its text encoders never learn.
    final_structure: DiffusionTrainConfig | None = DiffusionTrainConfig(
        mode="structure", steps=2400, batch_size=32, checkpoint_every=200, log_every=20, ema_decay=0.995,
        train_text_encoders=False, optim=OptimConfig(learning_rate=1e-3, warmup_steps=100),
    )
    model_channels: int = 32
    model_seed: int = 0

    @field_validator("structure_unet")
    @classmethod
    def _layout(cls, value: dict[str, Any]) -> dict[str, Any]:
        from diffusion.config import UNET_LAYOUT_FIELDS, UNetConfig

        other = sorted(set(value) - set(UNET_LAYOUT_FIELDS))
        if other:
            raise ValueError(f"{', '.join(other)}: not a layout setting; expected some of {', '.join(UNET_LAYOUT_FIELDS)}")
        base = shipped_tiny_config().structure_unet
        UNetConfig.model_validate({**base.model_dump(), **value})
        return value

    @model_validator(mode="after")
    def _final_stage(self) -> "TinyModelRecipe":
        final = self.final_structure
        if final is None:
            return self
        if self.text is not None or self.text_learns_in != "structure":
            raise ValueError("final_structure: only when the structure stage trains the text encoders (text None, "
                             "text_learns_in 'structure'); set final_structure None otherwise")
        if final.mode != "structure" or final.train_text_encoders:
            raise ValueError("final_structure: expected mode 'structure' with train_text_encoders False")
        return self


# The values of settings added to the recipe after its first runs: a work directory's report written before a
# setting existed lacks it, and that run had these values.
_BEFORE_ADDED = {"text": None, "structure_prediction": "epsilon", "structure_unet": {}, "text_learns_in": "structure",
                 "final_structure": None}


def final_structure_config(base: ModelConfig, recipe: TinyModelRecipe) -> ModelConfig:
    """The model config with the final structure generator's layout (`structure_unet`) over `base`'s."""
    unet = base.structure_unet
    unet = type(unet).model_validate({**unet.model_dump(), **recipe.structure_unet,
                                      "prediction": recipe.structure_prediction})
    return base.model_copy(update={"structure_unet": unet})


def _describe(recipe: TinyModelRecipe) -> str:
    encoders = (f"Text encoders pre-trained contrastively against the images ({recipe.text.steps} steps x "
                f"{recipe.text.batch_size}), then frozen. " if recipe.text else "Text encoders trained with the "
                f"{recipe.text_learns_in} generator. ")
    layout = "".join(f", {k} {v}" for k, v in sorted(recipe.structure_unet.items()))
    final = recipe.final_structure
    if final is not None:
        encoders = (f"Text encoders trained with a first structure generator ({recipe.structure.steps} steps x "
                    f"{recipe.structure.batch_size}). ")
        structure = (f"Structure generator t>=500 ({recipe.structure_prediction}-prediction{layout}, trained fresh "
                     f"against the frozen text encoders, {final.steps} steps x {final.batch_size}, EMA "
                     f"{final.ema_decay}, all images incl. upsampled low-resolution ones)")
    else:
        structure = (f"Structure generator t>=500 ({recipe.structure_prediction}-prediction{layout}, "
                     f"{recipe.structure.steps} steps x {recipe.structure.batch_size}, all images incl. upsampled "
                     f"low-resolution ones)")
    return (
        f"{SHIPPED_NAME}: a tiny bilingual (English/Chinese/mixed) PanGu-Draw trained from scratch on "
        f"{recipe.data.num_images} synthetic images (diffusion.synthetic: {len(synthetic.SHAPES)} shapes, "
        f"{len(synthetic.COLOURS)} colours, {len(synthetic.PATTERNS)} fill patterns, coloured backgrounds) at 64x64 "
        f"and 80x48/48x80. {encoders}{structure}, "
        f"texture generator t<500 ({recipe.texture.steps} steps x {recipe.texture.batch_size} 32x32-pixel crops). "
        f"Reproduce with `pangudraw train tiny`."
    )


def refit_latent_scale(model, data: ImageTextSet) -> tuple[float, float]:
    """Fit the VAE's latent scale factor on the full-resolution images and store it in `model.config`; returns the
    scale and the reconstruction PSNR (dB) on up to 64 images of the square bucket (or the nearest one)."""
    from diffusion.training.vae_trainer import fit_scale_factor, reconstruction_psnr

    images = bucket_images(data, model.config.bucket_scales[0], use_low_resolution=False).images
    scale = fit_scale_factor(model, images)
    cfg = model.config
    model.config = cfg.model_copy(update={"vae": cfg.vae.model_copy(update={"scale_factor": scale})})
    square = images[min(images, key=lambda b: abs(b - 5))][:64]
    return scale, reconstruction_psnr(model, square)


def load_synthetic(path: Path) -> ImageTextSet:
    import pyarrow.parquet as pq

    return ImageTextSet.from_table(read_tables([pq.read_table(path)]))


def contrastive_text_recipe(recipe: TinyModelRecipe | None = None) -> TinyModelRecipe:
    """The variant measured in docs/training.md: a contrastive text stage, then frozen encoders, a v-prediction
    structure generator with EMA decay 0.995 (`pangudraw train tiny --text-stage`)."""
    recipe = recipe or TinyModelRecipe()
    return recipe.model_copy(update={"text": CONTRASTIVE_TEXT, "structure_prediction": "v", "final_structure": None,
                                     "structure_unet": {},
                                     "structure": recipe.structure.model_copy(update={"ema_decay": 0.995})})


def check_recipe_settings(report: dict, recipe: TinyModelRecipe, report_path: Path) -> dict:
    """The recipe's settings as JSON, after checking they are those of the run already in the work directory."""
    settings = json.loads(recipe.model_dump_json())
    stored = report.get("recipe")
    if stored is not None:
        # Settings added to the recipe later are absent from older reports; those runs had `_BEFORE_ADDED`.
        stored = {**json.loads(json.dumps(_BEFORE_ADDED)), **stored}
        if stored != settings:
            changed = sorted(k for k in settings if stored.get(k) != settings[k])
            raise UserError(f"{report_path.parent} holds a run of other recipe settings ({', '.join(changed)}; see "
                            f"{report_path}); continue it with those settings or start a new work directory")
    return settings


def build_tiny_model(out_dir: str | Path, work_dir: str | Path, recipe: TinyModelRecipe | None = None, *,
                     weights_dtype: str = "float16") -> dict:
    """Run (or continue) every stage; returns the report, also written to work_dir/report.json.

    The model directory written last stores its weights as `weights_dtype` (the shipped model: float16, half the
    bytes); every stage trains and checkpoints in float32, and the stages' own model directories stay float32.
    """
    from diffusion import runtime
    from diffusion.model import PanGuDraw, convert_weights, read_model_manifest
    from diffusion.tiny import build_tokenizers
    from diffusion.training.vae_trainer import VAETrainer, patch_mean_init

    recipe = recipe or TinyModelRecipe()
    runtime.configure("cpu")
    out_dir, work = Path(out_dir), Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    report_path = work / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {"stages": {}}
    report["recipe"] = check_recipe_settings(report, recipe, report_path)

    def save_report():
        report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")

    start = time.perf_counter()
    data_path = work / "data" / "synthetic.parquet"
    if not data_path.is_file():
        t0 = time.perf_counter()
        synthetic.write_parquet(recipe.data, data_path)
        report["stages"]["data"] = {"seconds": time.perf_counter() - t0, "rows": recipe.data.num_images}
        save_report()
    data = load_synthetic(data_path)

    config = shipped_tiny_config(model_channels=recipe.model_channels)
    # With a final structure stage the first structure generator keeps the shipped layout.
    first = recipe.model_copy(update={"structure_unet": {}}) if recipe.final_structure is not None else recipe
    config = final_structure_config(config, first)
    tok_dir = work / "tokenizers"
    toks = build_tokenizers(tok_dir, tokenizer_corpus(), config)

    vae_dir = work / "models" / "vae"
    if not (vae_dir / "model.json").is_file():
        t0 = time.perf_counter()
        model = PanGuDraw.random(config, toks, seed=recipe.model_seed, batch_invariant=False)
        patch_mean_init(model.nets["vae"])  # a resumed run's checkpoint replaces these weights
        trainer = VAETrainer(model, data, recipe.vae, work / "runs" / "vae")
        rows = trainer.train()
        trainer.finish()
        scale, psnr = refit_latent_scale(model, data)
        model.save(vae_dir, description=f"{SHIPPED_NAME} after VAE training (UNets untrained)", trained=False)
        report["stages"]["vae"] = {"seconds": time.perf_counter() - t0, "steps": recipe.vae.steps,
                                   "final_loss": rows[-1]["loss"] if rows else None, "scale_factor": scale,
                                   "psnr_db": psnr}
        save_report()
        log.info("VAE done: scale factor %.5g, reconstruction PSNR %.2f dB", scale, psnr)

    if recipe.text is None and recipe.text_learns_in == "texture":
        # The texture generator trains both text encoders, then the structure generator reads them frozen.
        texture_dir = work / "models" / "texture"
        learning = recipe.texture.model_copy(update={"train_text_encoders": True})
        frozen = recipe.structure.model_copy(update={"train_text_encoders": False})
        _diffusion_stage(report, "texture", vae_dir, texture_dir, data, learning, work, save_report,
                         f"{SHIPPED_NAME} after texture training (structure UNet untrained)", trained=False)
        _diffusion_stage(report, "structure", texture_dir, out_dir, data, frozen, work, save_report,
                         _describe(recipe), trained=True)
    elif recipe.text is None:
        # The structure generator trains both text encoders, then the texture generator; then, with
        # `final_structure`, a fresh structure generator of the `structure_unet` layout on the frozen encoders.
        structure_dir, texture_dir = work / "models" / "structure", work / "models" / "texture"
        _diffusion_stage(report, "structure", vae_dir, structure_dir, data, recipe.structure, work, save_report,
                         f"{SHIPPED_NAME} after structure training (texture UNet untrained)", trained=False)
        if recipe.final_structure is None:
            _diffusion_stage(report, "texture", structure_dir, out_dir, data, recipe.texture, work, save_report,
                             _describe(recipe), trained=True)
        else:
            _diffusion_stage(report, "texture", structure_dir, texture_dir, data, recipe.texture, work, save_report,
                             f"{SHIPPED_NAME} after texture training (the structure generator is replaced next)",
                             trained=False)
            final = recipe.final_structure.model_copy(update={"train_text_encoders": False})
            base = ModelConfig.model_validate(read_model_manifest(texture_dir)["config"])
            _diffusion_stage(report, "final_structure", texture_dir, out_dir, data, final, work, save_report,
                             _describe(recipe), trained=True, model_config=final_structure_config(base, recipe),
                             seed=recipe.model_seed)
    else:
        text_dir = work / "models" / "text"
        if not (text_dir / "model.json").is_file():
            report["stages"]["text"] = train_text_stage(vae_dir, data, recipe.text, work / "runs" / "text", text_dir)
            save_report()
        texture_dir = work / "models" / "texture"
        frozen = recipe.structure.model_copy(update={"train_text_encoders": False})
        _diffusion_stage(report, "texture", text_dir, texture_dir, data, recipe.texture, work, save_report,
                         f"{SHIPPED_NAME} after texture training (structure UNet untrained)", trained=False)
        _diffusion_stage(report, "structure", texture_dir, out_dir, data, frozen, work, save_report,
                         _describe(recipe), trained=True)

    report["weights"] = convert_weights(out_dir, weights_dtype)  # nothing is rewritten when already stored so
    log.info("%s: weights stored as %s (%.1f MB)", out_dir, weights_dtype, report["weights"]["bytes_after"] / 2**20)
    report["seconds_this_call"] = time.perf_counter() - start
    save_report()
    return report


def _diffusion_stage(report: dict, stage: str, in_dir: Path, out_dir: Path, data: ImageTextSet,
                     config: DiffusionTrainConfig, work: Path, save_report, description: str, *,
                     trained: bool, model_config: ModelConfig | None = None, seed: int = 0) -> None:
    """`train_diffusion_stage` for the recipe: skipped when done, its report kept in the work directory's."""
    if (out_dir / "model.json").is_file() and report["stages"].get(stage) is not None:
        return
    report["stages"][stage] = train_diffusion_stage(in_dir, data, config, work / "runs" / stage, out_dir,
                                                    description=description, trained=trained,
                                                    model_config=model_config, seed=seed)
    save_report()


def tokenizer_corpus() -> list[str]:
    """The texts both vocabularies are built from: every caption word in context, Chinese characters spaced apart
    so the byte-level BPE learns characters rather than whole Chinese phrases (as CLIP's own vocabulary does)."""
    out = []
    for text in synthetic.text_corpus():
        out.append("".join(f" {ch} " if "\u4e00" <= ch <= "\u9fff" else ch for ch in text))
    return out


def _stage_report(trainer, rows: list[dict], seconds: float) -> dict:
    loop = trainer.loop
    return {
        "seconds": seconds,
        "steps": loop.step,
        "images_seen": loop.images_seen,
        "unet_latent_pixel_steps": loop.pixels_seen,
        "final_loss": rows[-1]["loss"] if rows else None,
        "images_per_s": rows[-1]["images_per_s"] if rows else None,
        "data": trainer.data_usage(),
    }


def train_diffusion_stage(base_model_dir: str | Path, data: ImageTextSet, config: DiffusionTrainConfig,
                          run_dir: str | Path, out_dir: str | Path, *, model_config: ModelConfig | None = None,
                          seed: int = 0, description: str = "", trained: bool = True) -> dict:
    """Train one UNet stage starting from `base_model_dir` (its VAE, tokenizers and text encoders), save `out_dir`.

    With `model_config` (e.g. a monolithic or wider config, or another prediction), a fresh model of that config
    is made and the base's VAE, tokenizers and text encoders are copied in, and so is the base's other generator
    (the one this stage does not train) when both models have two generators and its config is unchanged.
    """
    from diffusion import checkpoints
    from diffusion.model import PanGuDraw, read_model_manifest
    from diffusion.training.diffusion_trainer import DiffusionTrainer

    base_model_dir = Path(base_model_dir)
    t0 = time.perf_counter()
    if model_config is None:
        model = PanGuDraw.load(base_model_dir, batch_invariant=False)
    else:
        base_config = ModelConfig.model_validate(read_model_manifest(base_model_dir)["config"])
        model_config = model_config.model_copy(update={"vae": base_config.vae})
        kept = []
        if not (model_config.monolithic or base_config.monolithic):
            other = "structure" if config.mode == "texture" else "texture"
            if getattr(model_config, f"{other}_unet") == getattr(base_config, f"{other}_unet"):
                kept = [other]
        base = PanGuDraw.load(base_model_dir, components={"text", "vae", *kept}, batch_invariant=False)
        model = PanGuDraw.random(model_config, base.tokenizers, seed=seed, batch_invariant=False)
        for name in ("vae", "text_encoder_1", "text_encoder_2", *(f"{k}_unet" for k in kept)):
            state = checkpoints.state_dict(base.nets[name])
            checkpoints.load_state(model.nets[name], state, source=str(base_model_dir))
    trainer = DiffusionTrainer(model, data, config, run_dir)
    rows = trainer.train()
    trainer.finish()
    model.save(out_dir, description=description or f"{model.config.name}: {config.mode} stage", trained=trained)
    return _stage_report(trainer, rows, time.perf_counter() - t0)


def train_text_stage(base_model_dir: str | Path, data: ImageTextSet, config: TextTrainConfig, run_dir: str | Path,
                     out_dir: str | Path) -> dict:
    """Pre-train both text encoders of the model at `base_model_dir` contrastively (text_trainer), save `out_dir`.

    The UNets are kept but marked untrained: they were fitted to the old encoders' outputs."""
    from diffusion.model import PanGuDraw
    from diffusion.training.text_trainer import TextEncoderTrainer

    t0 = time.perf_counter()
    model = PanGuDraw.load(base_model_dir, batch_invariant=False)
    trainer = TextEncoderTrainer(model, data, config, run_dir)
    rows = trainer.train()
    trainer.finish()
    retrieval = trainer.retrieval_accuracy()
    log.info("text encoders done: caption-to-image retrieval among 256 images %s", retrieval)
    cfg = model.config
    model.save(out_dir, description=f"{cfg.name}: text encoders pre-trained for {trainer.loop.step} steps",
               trained=False)
    return {"seconds": time.perf_counter() - t0, "steps": trainer.loop.step, "images_seen": trainer.loop.images_seen,
            "final_loss": rows[-1]["loss"] if rows else None,
            "images_per_s": rows[-1]["images_per_s"] if rows else None, "retrieval_at_256": retrieval}


def train_vae_stage(base_model_dir: str | Path, data: ImageTextSet, config: VAETrainConfig, run_dir: str | Path,
                    out_dir: str | Path) -> dict:
    """Train the VAE of the model at `base_model_dir`, refit its latent scale factor, save `out_dir`."""
    from diffusion.model import PanGuDraw
    from diffusion.training.vae_trainer import VAETrainer, fit_scale_factor, reconstruction_psnr

    t0 = time.perf_counter()
    model = PanGuDraw.load(base_model_dir, batch_invariant=False)
    trainer = VAETrainer(model, data, config, run_dir)
    rows = trainer.train()
    trainer.finish()
    images = bucket_images(data, model.config.bucket_scales[0], use_low_resolution=False).images
    if not images:
        raise ValueError("no full-resolution image fits the model's buckets")
    scale = fit_scale_factor(model, images)
    cfg = model.config
    model.config = cfg.model_copy(update={"vae": cfg.vae.model_copy(update={"scale_factor": scale})})
    largest = max(images, key=lambda b: len(images[b]))
    psnr = reconstruction_psnr(model, images[largest][:64])
    # A new latent space leaves the UNets of the base model behind: they need training on it again.
    model.save(out_dir, description=f"{cfg.name}: VAE trained for {trainer.loop.step} steps", trained=False)
    return {"seconds": time.perf_counter() - t0, "steps": trainer.loop.step,
            "final_loss": rows[-1]["loss"] if rows else None, "scale_factor": scale, "psnr_db": psnr}
