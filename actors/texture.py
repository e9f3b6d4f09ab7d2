"""Texture stage: the texture generator's denoising steps (t < T_s), continuing from the structure handoff."""
from __future__ import annotations

import numpy as np

from actors.base import ModelStage, failed_update
from actors.rows import pack, unpack_conditioning, unpack_handoff
from diffusion.model import Conditioning, GenerationRequest, Handoff


class TextureStage(ModelStage):
    """Holds the texture UNet; turns `handoff` into `latent` (the clean latent) and drops the conditioning."""

    name = "texture"
    components = frozenset({"texture"})

    def sample(self, requests: list[GenerationRequest], conds: list[Conditioning],
               handoffs: list[Handoff]) -> np.ndarray:
        padded_requests, padded_conds, padded_handoffs = self.padded(requests, conds, handoffs)
        return self.model.sample_texture(padded_requests, padded_conds, padded_handoffs)[: len(requests)]

    def process(self, units, requests):
        conds = [unpack_conditioning(u["cond"]) for u in units]
        handoffs = [unpack_handoff(u["handoff"]) for u in units]
        updates = []
        for latent in self.sample(requests, conds, handoffs):
            if not np.isfinite(latent).all():
                update = failed_update(self.name, "the latent has non-finite values (NaN or inf)")
            else:
                update = {"latent": pack({"latent": latent.astype(np.float32)})}
            updates.append({**update, "cond": None, "handoff": None})
        return updates
