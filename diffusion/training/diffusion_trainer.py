"""Epsilon-prediction training of a UNet on its own timestep range: the structure generator (t in [T_s, T)), the
texture generator (t in [0, T_s)) or a monolithic model (all t) (SPEC section 7).

- Structure: every image, low-resolution ones upsampled to their bucket (at high noise the missing detail is
  invisible); whole latents, one aspect bucket per batch. The text encoders learn with it through the same loss.
- Texture: full-resolution images only, as random square latent crops (cheaper per image; low-noise denoising is
  local), sampled later at full size. The text encoders are frozen: they were trained with the structure generator,
  and moving them here would change what the structure generator was trained to read.
- Monolithic: full-resolution images, whole latents, all t, text encoders trained jointly.

The images are encoded once by the (already trained) VAE; latents are cached in the run directory.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from diffusion import buckets
from diffusion.guidance import STYLE_TRIGGERS
from diffusion.training.config import DiffusionTrainConfig
from diffusion.training.data import BatchOrder, BucketedImages, ImageTextSet, bucket_images, step_rng
from diffusion.training.loop import Batch, LoopTrainer, TrainingLoop

log = logging.getLogger(__name__)


class DiffusionLoss(nn.Cell):
    """Mean squared error between the UNet's output and its target for x_t = sqrt(a) x0 + sqrt(1 - a) eps: the noise
    eps, or with `v_prediction` the velocity v = sqrt(a) eps - sqrt(1 - a) x0 (UNetConfig.prediction); each
    sample's error times its `weight` (all ones: the plain loss; see `loss_weights`).

    The conditioning is computed inside, from token ids, so the text encoders get gradients when they train.
    """

    def __init__(self, unet: nn.Cell, text_encoder_1: nn.Cell, text_encoder_2: nn.Cell, *,
                 v_prediction: bool = False):
        super().__init__()
        self.unet = unet
        self.text_encoder_1 = text_encoder_1
        self.text_encoder_2 = text_encoder_2
        self.v_prediction = v_prediction

    def construct(self, latents, noise, sqrt_alpha, sqrt_one_minus_alpha, timesteps, ids_1, ids_2, bucket_vec,
                  weight):
        x_t = self.noised(latents, noise, sqrt_alpha, sqrt_one_minus_alpha)
        target = self.target(latents, noise, sqrt_alpha, sqrt_one_minus_alpha)
        return self.output_loss(x_t, target, timesteps, ids_1, ids_2, bucket_vec, weight)

    def noised(self, latents, noise, sqrt_alpha, sqrt_one_minus_alpha):
        b = latents.shape[0]
        return sqrt_alpha.reshape(b, 1, 1, 1) * latents + sqrt_one_minus_alpha.reshape(b, 1, 1, 1) * noise

    def target(self, latents, noise, sqrt_alpha, sqrt_one_minus_alpha):
        if not self.v_prediction:
            return noise
        b = latents.shape[0]
        return sqrt_alpha.reshape(b, 1, 1, 1) * noise - sqrt_one_minus_alpha.reshape(b, 1, 1, 1) * latents

    def output_loss(self, unet_input, target, timesteps, ids_1, ids_2, bucket_vec, weight):
        hidden_1 = self.text_encoder_1(ids_1)
        hidden_2, pooled = self.text_encoder_2(ids_2)
        context = ops.concat((hidden_1, hidden_2), axis=-1)
        y = ops.concat((pooled, bucket_vec), axis=-1)
        out = self.unet(unet_input, timesteps, context, y)
        per_sample = ops.mean(ops.square(out.astype(ms.float32) - target), axis=(1, 2, 3))
        return ops.mean(per_sample * weight)


class ControlDiffusionLoss(DiffusionLoss):
    """`DiffusionLoss` of a control model: the layout map (diffusion.control) is concatenated to x_t's channels."""

    def construct(self, latents, noise, sqrt_alpha, sqrt_one_minus_alpha, timesteps, ids_1, ids_2, bucket_vec,
                  weight, control):
        x_t = self.noised(latents, noise, sqrt_alpha, sqrt_one_minus_alpha)
        target = self.target(latents, noise, sqrt_alpha, sqrt_one_minus_alpha)
        return self.output_loss(ops.concat((x_t, control), axis=1), target, timesteps, ids_1, ids_2, bucket_vec,
                                weight)


def timestep_range(mode: str, switch_timestep: int, num_train_timesteps: int) -> tuple[int, int]:
    """[low, high) of the timesteps a trainer of `mode` draws from."""
    if mode == "structure":
        return switch_timestep, num_train_timesteps
    if mode == "texture":
        return 0, switch_timestep
    if mode == "monolithic":
        return 0, num_train_timesteps
    raise ValueError(f"unknown mode {mode!r}")


def loss_weights(weighting: str, alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """Per-sample weights of the epsilon loss, with mean 1 over the batch.

    "epsilon": all ones. "truncated_snr": max(1, 1/SNR(t)), so a sample's loss is the larger of its epsilon error
    and its x0 error (||x0 - x0_hat||^2 = ||eps - eps_hat||^2 / SNR); at high noise, where the plain epsilon loss
    hardly rewards getting the image right (x0 errors are 1/SNR times the epsilon errors there), it weighs the x0
    error instead.
    """
    if weighting == "epsilon":
        return np.ones(len(timesteps), np.float32)
    if weighting == "truncated_snr":
        a = alphas_cumprod[timesteps].astype(np.float64)
        w = np.maximum(1.0, (1.0 - a) / a)
        return (w / w.mean()).astype(np.float32)
    raise ValueError(f"unknown loss weighting {weighting!r}")


def sample_timesteps(rng: np.random.Generator, mode: str, switch_timestep: int, num_train_timesteps: int,
                     count: int) -> np.ndarray:
    low, high = timestep_range(mode, switch_timestep, num_train_timesteps)
    return rng.integers(low, high, size=count).astype(np.int32)


class DiffusionTrainer(LoopTrainer):
    """Trains one UNet of `model` (a PanGuDraw with every component) in place; see the module docstring."""

    def __init__(self, model, data: ImageTextSet, config: DiffusionTrainConfig, run_dir: str | Path):
        self.config = config = config.resolved()
        self.model = model
        self.run_dir = Path(run_dir)
        mc = model.config
        if config.mode == "monolithic" and not mc.monolithic:
            raise ValueError("monolithic training needs a model config with monolithic=True (one UNet for all t)")
        if config.mode != "monolithic" and mc.monolithic:
            raise ValueError(f"{config.mode} training needs a two-generator model config (monolithic=False)")
        self.unet_name = "texture_unet" if config.mode == "texture" else "structure_unet"
        self.low, self.high = timestep_range(config.mode, mc.switch_timestep, mc.num_train_timesteps)
        acp = self.alphas_cumprod = np.asarray(model.schedule.alphas_cumprod, np.float64)
        self.sqrt_alpha = np.sqrt(acp).astype(np.float32)
        self.sqrt_one_minus_alpha = np.sqrt(1.0 - acp).astype(np.float32)
        self.bucketed = bucket_images(data, mc.bucket_scales[0], use_low_resolution=bool(config.use_low_resolution),
                                      low_resolution_area=config.low_resolution_area)
        self.captions = data.captions
        self.latents = self._encode_latents()
        shapes = {b: v.shape[1:] for b, v in self.latents.items()}
        # A control model learns from each image's own layout map (diffusion.control), at its latent size.
        self.controls: dict[int, np.ndarray] | None = None
        if mc.control_channels:
            from diffusion import control

            self.controls = {b: np.repeat(control.layout_maps(self.bucketed.images[b], shapes[b][1:]),
                                          mc.control_channels, axis=1) for b in self.latents}
        self.crop = config.crop_latent
        if self.crop:
            too_small = {b: s for b, s in shapes.items() if min(s[1], s[2]) < self.crop}
            if too_small:
                raise ValueError(f"latent crop {self.crop} is larger than the latents of buckets {too_small}")
            # Crops all have one shape, so one batch may mix buckets.
            self._flat = [(b, i) for b in sorted(self.latents) for i in range(len(self.latents[b]))]
            groups = {0: np.arange(len(self._flat))}
        else:
            groups = {b: np.arange(len(v)) for b, v in self.latents.items()}
        self.order = BatchOrder(groups, config.batch_size, config.seed)
        nets = {self.unet_name: model.nets[self.unet_name]}
        if config.train_text_encoders:
            nets["text_encoder_1"] = model.nets["text_encoder_1"]
            nets["text_encoder_2"] = model.nets["text_encoder_2"]
        else:
            model.nets["text_encoder_1"].set_train(False)
            model.nets["text_encoder_2"].set_train(False)
        loss_cls = ControlDiffusionLoss if self.controls is not None else DiffusionLoss
        self.prediction = getattr(mc, self.unet_name).prediction
        loss = loss_cls(model.nets[self.unet_name], model.nets["text_encoder_1"], model.nets["text_encoder_2"],
                        v_prediction=self.prediction == "v")
        describe = {"trainer": "diffusion", "mode": config.mode, "timesteps": [self.low, self.high],
                    "prediction": self.prediction,
                    "rows_total": self.bucketed.rows_total, "rows_used": self.bucketed.rows_used}
        self.loop = TrainingLoop(self.run_dir, config, nets, loss, describe=describe)

    # ------------------------------------------------------------------ data

    def _encode_latents(self) -> dict[int, np.ndarray]:
        """Scaled VAE latents (posterior mean) of every bucketed image, cached in the run directory."""
        from diffusion import checkpoints

        digest = hashlib.sha256()
        for name, value in sorted(checkpoints.state_dict(self.model.nets["vae"]).items()):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(value).tobytes())
        digest.update(repr(self.model.config.vae.scale_factor).encode())
        for b in sorted(self.bucketed.images):
            digest.update(str(b).encode())
            digest.update(self.bucketed.images[b].tobytes())
        key = digest.hexdigest()[:24]
        cache = self.run_dir / f"latents-{key}.npz"
        if cache.is_file():
            with np.load(cache) as z:
                return {int(k.split("_")[1]): z[k] for k in z.files}
        was_invariant = getattr(self.model, "batch_invariant", False)
        self.model.batch_invariant = False  # encoding in batches is faster; bit-equality across batches is not needed
        try:
            out = {}
            for b, imgs in sorted(self.bucketed.images.items()):
                parts = [self.model.encode_images(imgs[i:i + 64]) for i in range(0, len(imgs), 64)]
                out[b] = np.concatenate(parts).astype(np.float32)
        finally:
            self.model.batch_invariant = was_invariant
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / f"latents-{key}.tmp.npz"
        np.savez(tmp, **{f"bucket_{b}": v for b, v in out.items()})
        tmp.replace(cache)
        log.info("encoded %d images to latents %s", sum(len(v) for v in out.values()),
                 {b: v.shape[1:] for b, v in out.items()})
        return out

    def _caption(self, rng: np.random.Generator, row: int) -> str:
        cfg = self.config
        if rng.random() < cfg.caption_dropout:
            return ""
        options = self.captions[row]
        text = options[rng.integers(len(options))]
        if rng.random() < cfg.style_trigger_rate:
            text = list(STYLE_TRIGGERS.values())[rng.integers(len(STYLE_TRIGGERS))] + text
        return text

    def make_batch(self, micro_step: int) -> Batch:
        cfg = self.config
        rng = step_rng(cfg.seed, micro_step)
        key, members = self.order.batch(micro_step)
        if self.crop:
            picks = [self._flat[m] for m in members]
            c = self.crop
            latents, controls = [], []
            for b, i in picks:
                lat = self.latents[b][i]
                oy = rng.integers(lat.shape[1] - c + 1)
                ox = rng.integers(lat.shape[2] - c + 1)
                latents.append(lat[:, oy:oy + c, ox:ox + c])
                if self.controls is not None:
                    controls.append(self.controls[b][i][:, oy:oy + c, ox:ox + c])
            x0 = np.stack(latents)
            control_maps = np.stack(controls) if controls else None
        else:
            picks = [(key, int(m)) for m in members]
            x0 = self.latents[key][members]
            control_maps = self.controls[key][members] if self.controls is not None else None
        rows = [int(self.bucketed.source[b][i]) for b, i in picks]
        texts = [self._caption(rng, r) for r in rows]
        mc = self.model.config
        t = sample_timesteps(rng, cfg.mode, mc.switch_timestep, mc.num_train_timesteps, len(rows))
        noise = rng.standard_normal(x0.shape, dtype=np.float32)
        toks = self.model.tokenizers
        ids_1 = toks["text_encoder_1"](texts)
        ids_2 = toks["text_encoder_2"](texts)
        dim = self.model.config.bucket_embed_dim
        bucket_vec = np.stack([buckets.bucket_embedding(b, dim) for b, _ in picks])
        weight = loss_weights(cfg.loss_weighting, self.alphas_cumprod, t)
        inputs = (x0.astype(np.float32), noise, self.sqrt_alpha[t], self.sqrt_one_minus_alpha[t], t, ids_1, ids_2,
                  bucket_vec, weight)
        if control_maps is not None:
            dropped = rng.random(len(rows)) < cfg.control_dropout
            inputs += (np.where(dropped[:, None, None, None], np.float32(0.0), control_maps).astype(np.float32),)
        return Batch(inputs, images=len(rows), pixels=int(x0.shape[2] * x0.shape[3]))

    # ------------------------------------------------------------------ training

    def data_usage(self) -> dict:
        """How much of the data set this trainer could use, and at which latent sizes."""
        b = self.bucketed
        return {"rows_total": b.rows_total, "rows_used": b.rows_used, "fraction_used": b.rows_used / b.rows_total,
                "low_resolution_used": int(sum(v.sum() for v in b.low_resolution.values())),
                "latent_shapes": {str(k): list(v.shape[1:]) for k, v in self.latents.items()},
                "crop_latent": self.crop}
