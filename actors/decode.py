"""Decode stage: the VAE turns clean latents into uint8 pixels."""
from __future__ import annotations

import numpy as np

from actors.base import ModelStage, failed_update
from actors.rows import pack, unpack


class DecodeStage(ModelStage):
    """Holds the VAE; turns `latent` into `pixels` (uint8, H x W x 3)."""

    name = "decode"
    components = frozenset({"vae"})
    serves = "any"  # fused rows arrive as clean latents of this model too

    def group_of(self, unit: dict) -> str:
        return f"{unit['width']}x{unit['height']}"

    def decode(self, latents: np.ndarray) -> np.ndarray:
        n = len(latents)
        if self.pad_batches and n < self.batch_size:
            latents = np.concatenate([latents, np.repeat(latents[-1:], self.batch_size - n, axis=0)])
        # A NaN or inf in the VAE's output would be cast to an arbitrary byte: raise instead, so the row fails.
        with np.errstate(invalid="raise"):
            return self.model.decode(latents)[:n]

    def process(self, units, requests):
        latents = [unpack(u["latent"])["latent"] for u in units]
        finite = [i for i, latent in enumerate(latents) if np.isfinite(latent).all()]
        updates = [failed_update(self.name, "the latent has non-finite values (NaN or inf)") for _ in units]
        if finite:
            images = self.decode(np.stack([latents[i] for i in finite]))
            for i, image in zip(finite, images):
                updates[i] = {"pixels": pack({"image": image})}
        return [{**update, "latent": None} for update in updates]
