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
from diffusion.training.loop import Batch, LoopTrainer, TrainingLoop

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


def patch_mean_init(vae) -> None:
    """Set a norm-free VAE's weights so that decode(encode(x)) is, from step 0, the f x f patch mean of x.

    Every residual branch ends in a zero conv (each block is the identity), the down- and upsampling convs average
    2x2 and copy, the 1x1 width-changing shortcuts embed their input channels, and each colour channel c rides in
    a pair of feature channels (c, -c): a layer that reads SiLU of its input recovers c exactly, as
    silu(c) - silu(-c) = c. Every other weight keeps its random initialisation, so gradients reach all of them.
    Training then starts from a colour-exact, blurred reconstruction and spends its steps on edges and fill
    patterns; from a random start the tiny VAE learned the shapes well before the palette (after 200 steps of 16
    crops black still came back purple).
    """
    import mindspore as ms

    from diffusion.nets import vae as vae_mod

    cfg = vae.cfg
    if cfg.norm_groups != 0:
        raise ValueError("patch_mean_init needs a VAE without norms (norm_groups 0): a norm rescales the colour")
    if cfg.in_channels != 3 or cfg.out_channels != 3 or cfg.embed_dim < 3 or cfg.ch < 6:
        raise ValueError("patch_mean_init needs RGB in and out, at least 3 latent channels and 6 feature channels")
    rgb = np.arange(3)

    def put(conv, weight, bias):
        conv.weight.set_data(ms.Tensor(weight.astype(np.float32)).astype(conv.weight.dtype))
        conv.bias.set_data(ms.Tensor(bias.astype(np.float32)).astype(conv.bias.dtype))

    def current(conv):
        return conv.weight.asnumpy().astype(np.float32).copy(), conv.bias.asnumpy().astype(np.float32).copy()

    def zero(conv):
        w, b = current(conv)
        put(conv, np.zeros_like(w), np.zeros_like(b))

    def channel_diagonal(conv, taps: dict[tuple[int, int], float]):
        w, b = current(conv)
        w[:] = 0.0
        n = min(w.shape[0], w.shape[1])
        for (ky, kx), value in taps.items():
            w[np.arange(n), np.arange(n), ky, kx] = value
        put(conv, w, np.zeros_like(b))

    for _, cell in vae.cells_and_names():
        if isinstance(cell, vae_mod._ResnetBlock):
            zero(cell.conv2)
            if cell.has_shortcut:
                channel_diagonal(cell.nin_shortcut, {(0, 0): 1.0})
        elif isinstance(cell, vae_mod._SpatialSelfAttention):
            zero(cell.proj_out)
        elif isinstance(cell, vae_mod._Downsample):
            channel_diagonal(cell.conv, {(0, 0): 0.25, (0, 1): 0.25, (1, 0): 0.25, (1, 1): 0.25})
        elif isinstance(cell, vae_mod._Upsample):
            channel_diagonal(cell.conv, {(1, 1): 1.0})
    channel_diagonal(vae.quant_conv, {(0, 0): 1.0})
    channel_diagonal(vae.post_quant_conv, {(0, 0): 1.0})

    def split(conv):
        # Input channels 0-2 (RGB or latent) -> feature channels 0-2 (+c) and 3-5 (-c); other rows stay random.
        w, b = current(conv)
        k = w.shape[2] // 2
        w[:6] = 0.0
        b[:6] = 0.0
        w[rgb, rgb, k, k] = 1.0
        w[rgb + 3, rgb, k, k] = -1.0
        put(conv, w, b)

    def merge(conv, all_rows: bool):
        # SiLU'd feature pairs -> channels 0-2: silu(c) - silu(-c) = c.
        w, b = current(conv)
        k = w.shape[2] // 2
        rows = slice(None) if all_rows else slice(0, 3)
        w[rows] = 0.0
        b[rows] = 0.0
        w[rgb, rgb, k, k] = 1.0
        w[rgb, rgb + 3, k, k] = -1.0
        put(conv, w, b)

    split(vae.encoder.conv_in)
    merge(vae.encoder.conv_out, all_rows=False)  # the posterior mean's channels 0-2; the rest stays random
    split(vae.decoder.conv_in)
    merge(vae.decoder.conv_out, all_rows=True)   # RGB reads the colour pairs only, at the start


# See TrainingLoop: a fresh compiled VAE training step after this many launches (below the 18 that stall).
VAE_REBUILD_EVERY = 16


class VAETrainer(LoopTrainer):
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
