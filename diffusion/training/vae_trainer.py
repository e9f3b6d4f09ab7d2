"""Training of the KL autoencoder: L1 reconstruction plus a small KL term, on random crops of full-resolution images.

The VAE is convolutional, so crops teach it the whole image at a fraction of the cost. After training,
`fit_scale_factor` measures the latents' standard deviation and returns the factor that scales them to unit
variance (the role of SDXL's 0.13025), which the diffusion trainers and sampling then use.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from mindspore import nn, ops

from diffusion.training.config import VAETrainConfig
from diffusion.training.data import BatchOrder, ImageTextSet, bucket_images, step_rng
from diffusion.training.loop import Batch, TrainingLoop

log = logging.getLogger(__name__)


class VAELoss(nn.Cell):
    """mean |decode(z) - x| + kl_weight * KL(q(z|x) || N(0, I)), the KL summed over a latent's elements and averaged
    over the batch, as in LDM.

    With `sample_posterior` z is drawn by the reparameterisation trick; without it z is the posterior mean. At a
    few hundred steps the drawn z fails: the posterior starts at unit variance, the noise drowns the mean, and the
    decoder learns only two or three colours of the synthetic palette before the variance comes down. The
    generators read the posterior mean (`PanGuDraw.encode_images`), so the mean is what must reconstruct.
    """

    def __init__(self, vae: nn.Cell, kl_weight: float, sample_posterior: bool = False):
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight
        self.sample_posterior = sample_posterior

    def construct(self, images, noise):
        mean, logvar = self.vae.encode(images)
        z = mean + ops.exp(0.5 * logvar) * noise if self.sample_posterior else mean
        recon = self.vae.decode(z)
        rec_loss = ops.mean(ops.abs(recon - images))
        kl = 0.5 * ops.sum(ops.square(mean) + ops.exp(logvar) - 1.0 - logvar) / images.shape[0]
        return rec_loss + self.kl_weight * kl


# See TrainingLoop: a fresh compiled VAE training step after this many launches (below the 18 that stall).
VAE_REBUILD_EVERY = 16


class VAETrainer:
    """Trains `model.nets["vae"]` in place on random crops of the data set's full-resolution images."""

    def __init__(self, model, data: ImageTextSet, config: VAETrainConfig, run_dir: str | Path):
        self.model = model
        self.config = config
        self.run_dir = Path(run_dir)
        vae_cfg = model.config.vae
        if config.crop % vae_cfg.downsample_factor:
            raise ValueError(f"crop {config.crop} is not a multiple of the VAE's factor {vae_cfg.downsample_factor}")
        bucketed = bucket_images(data, model.config.bucket_scales[0], use_low_resolution=False,
                                 low_resolution_area=config.low_resolution_area)
        self.images = [img for b in sorted(bucketed.images) for img in bucketed.images[b]]
        small = [img.shape for img in self.images if min(img.shape[:2]) < config.crop]
        if small:
            raise ValueError(f"crop {config.crop} is larger than some images ({small[0]})")
        self.latent_channels = vae_cfg.embed_dim
        self.factor = vae_cfg.downsample_factor
        self.order = BatchOrder({0: np.arange(len(self.images))}, config.batch_size, config.seed)
        loss = VAELoss(model.nets["vae"], config.kl_weight, config.sample_posterior)
        self.loop = TrainingLoop(self.run_dir, config, {"vae": model.nets["vae"]}, loss,
                                 describe={"trainer": "vae", "images": len(self.images)}, rebuild_every=VAE_REBUILD_EVERY)

    def make_batch(self, micro_step: int) -> Batch:
        c = self.config.crop
        rng = step_rng(self.config.seed, micro_step)
        _, members = self.order.batch(micro_step)
        crops = []
        for m in members:
            img = self.images[int(m)]
            oy = rng.integers(img.shape[0] - c + 1)
            ox = rng.integers(img.shape[1] - c + 1)
            crops.append(img[oy:oy + c, ox:ox + c])
        x = np.stack(crops).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
        z = c // self.factor
        noise = rng.standard_normal((len(crops), self.latent_channels, z, z), dtype=np.float32)
        return Batch((x, noise), images=len(crops))

    def train(self, *, resume: bool = True, stop_after: int | None = None) -> list[dict]:
        if resume:
            self.loop.resume()
        return self.loop.run(self.make_batch, stop_after=stop_after)

    def finish(self) -> None:
        self.loop.copy_ema_into_nets()
        self.model.nets["vae"].set_train(False)
        # The compiled forwards of the model were built for inference; they read the same parameters.


def fit_scale_factor(model, images_by_bucket: dict[int, np.ndarray], limit: int = 512) -> float:
    """1 / std of the unscaled posterior means of up to `limit` images: the factor that gives unit-variance latents."""
    current = model.config.vae.scale_factor
    samples = []
    left = limit
    for _, imgs in sorted(images_by_bucket.items()):
        take = imgs[:left]
        for start in range(0, len(take), 64):
            samples.append((model.encode_images(take[start:start + 64]) / np.float32(current)).ravel())
        left -= len(take)
        if left <= 0:
            break
    std = float(np.concatenate(samples).std())
    return float(f"{1.0 / std:.5g}")


def reconstruction_psnr(model, images: np.ndarray) -> float:
    """Mean PSNR (dB) of decode(encode(x)) against x for uint8 images (B, H, W, 3) of one size."""
    latents = model.encode_images(images)
    recon = model.decode(latents).astype(np.float64)
    mse = ((recon - images.astype(np.float64)) ** 2).reshape(len(images), -1).mean(axis=1)
    return float(np.mean(10.0 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))
