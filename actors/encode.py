"""Encode stage: both text encoders, every guidance branch of a row, once per image."""
from __future__ import annotations

from actors.base import ModelStage
from actors.rows import pack_conditioning
from diffusion.model import Conditioning, GenerationRequest


class EncodeStage(ModelStage):
    """Holds the text encoders; fills `cond` (context and label input of every branch)."""

    name = "encode"
    components = frozenset({"text"})

    def encode(self, requests: list[GenerationRequest]) -> list[Conditioning]:
        return self.model.encode(requests)

    def process(self, units, requests):
        # The text batch is padded by the model itself, so no padding here.
        return [{"cond": pack_conditioning(cond)} for cond in self.encode(requests)]
