"""Structure stage: the structure generator's denoising steps (t >= T_s), from each row's own noise."""
from __future__ import annotations

import numpy as np

from actors.base import ModelStage, failed_update
from actors.rows import pack_handoff, unpack_conditioning
from diffusion.model import Conditioning, GenerationRequest, Handoff


class StructureStage(ModelStage):
    """Holds the structure UNet; turns `cond` into `handoff` (the latent and sampler state at the switch step)."""

    name = "structure"
    components = frozenset({"structure"})

    def sample(self, requests: list[GenerationRequest], conds: list[Conditioning]) -> list[Handoff]:
        padded_requests, padded_conds = self.padded(requests, conds)
        return self.model.sample_structure(padded_requests, padded_conds)[: len(requests)]

    def process(self, units, requests):
        conds = [unpack_conditioning(u["cond"]) for u in units]
        updates = []
        for handoff in self.sample(requests, conds):
            if not np.isfinite(handoff.latent).all():
                updates.append(failed_update(self.name, "the latent has non-finite values (NaN or inf)"))
            else:
                updates.append({"handoff": pack_handoff(handoff)})
        return updates
