"""Training settings, as pydantic models with defaults."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Mode = Literal["structure", "texture", "monolithic"]
Precision = Literal["fp32", "fp16", "bf16"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OptimConfig(_Frozen):
    """AdamW (MindSpore's AdamWeightDecay) with linear warm-up; no decay on biases and norm parameters."""

    learning_rate: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = Field(50, ge=0)
    # After the warm-up: "constant", or "cosine" from the rate down to 0 at the run's last step (LoopConfig.steps;
    # a resumed run with more steps follows the new, longer curve from where it is).
    schedule: Literal["constant", "cosine"] = "constant"
    # Clip gradients to this global norm (0 = off).
    grad_clip: float = Field(1.0, ge=0)


class LoopConfig(_Frozen):
    """What every trainer shares: steps, batch, accumulation, precision, EMA, checkpoints, logging."""

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1)
    # Micro-batches per optimizer step; the effective batch is batch_size * grad_accum.
    grad_accum: int = Field(1, ge=1)
    seed: int = 0
    # fp16/bf16 run the networks' compute in half precision with float32 master weights (fp16 with loss scaling).
    precision: Precision = "fp32"
    ema_decay: float = Field(0.999, ge=0, lt=1)
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(20, ge=1)
    optim: OptimConfig = OptimConfig()


class DiffusionTrainConfig(LoopConfig):
    """The epsilon-prediction trainer of one UNet: which timesteps, which data, and whether the text side learns."""

    mode: Mode = "structure"
    # Text encoders learn jointly with the UNet through the diffusion loss (None: for structure and monolithic).
    train_text_encoders: bool | None = None
    # Texture generator: square latent crops of this side (None: whole latents; default for texture: 8).
    crop_latent: int | None = None
    # Use low-resolution images (upsampled to their bucket); None: only the structure generator does.
    use_low_resolution: bool | None = None
    low_resolution_area: float = Field(0.6, gt=0, le=1)
    # Share of captions replaced by "" so classifier-free guidance has an unconditional model.
    caption_dropout: float = Field(0.1, ge=0, le=1)
    # Share of captions given a style trigger prefix (SPEC section 4); the data has no style signal, so the model
    # learns the triggers as no-ops and the default aesthetic scale leaves an image unchanged.
    style_trigger_rate: float = Field(0.05, ge=0, le=1)
    caption_columns: tuple[str, ...] | None = None
    # A control model (ModelConfig.control_channels > 0): share of rows given the all-zero control map, so the model
    # also generates without a control image.
    control_dropout: float = Field(0.1, ge=0, le=1)
    # How each sample's epsilon error counts (diffusion_trainer.loss_weights): "epsilon", the plain mean, or
    # "truncated_snr", max(1, 1/SNR(t)) times it (the x0 error where the noise dominates).
    loss_weighting: Literal["epsilon", "truncated_snr"] = "epsilon"

    def resolved(self) -> "DiffusionTrainConfig":
        """The same config with every None replaced by the default of its mode."""
        updates = {}
        if self.train_text_encoders is None:
            updates["train_text_encoders"] = self.mode != "texture"
        if self.use_low_resolution is None:
            updates["use_low_resolution"] = self.mode == "structure"
        if self.crop_latent is None and self.mode == "texture":
            updates["crop_latent"] = 8
        return self.model_copy(update=updates)


class VAETrainConfig(LoopConfig):
    """The KL autoencoder: L1 reconstruction + a small KL term, on random crops of the full-resolution images."""

    crop: int = Field(32, ge=8)
    kl_weight: float = Field(1e-6, ge=0)
    # Decode a drawn z (True) or the posterior mean (False; see VAELoss).
    sample_posterior: bool = False
    low_resolution_area: float = Field(0.6, gt=0, le=1)
    caption_columns: tuple[str, ...] | None = None


class TextTrainConfig(LoopConfig):
    """Contrastive (CLIP-style) pre-training of both text encoders against a small image tower, before the UNets.

    PanGu-Draw's text encoders come pre-trained on image-text pairs and stay frozen while its generators learn; this
    stage gives a model trained from scratch the same kind of encoders: each caption's embedding (text encoder 1:
    the mean of its last layer over the caption's tokens; text encoder 2: its pooled projection) must pick out its
    own image among the batch's images. The image tower and the two projection heads are thrown away afterwards.
    """

    batch_size: int = Field(128, ge=2)
    # Images are read at this square side (every image resized to it, low-resolution ones included).
    image_side: int = Field(32, ge=8)
    # Width of the joint embedding space and of the image tower.
    embed_dim: int = Field(64, ge=4)
    tower_width: int = Field(32, ge=4)
    # Initial temperature of the softmax (CLIP's 0.07); it is learned, capped at 1/100 as CLIP caps it.
    temperature: float = Field(0.07, gt=0, le=1)
