"""Per-row noise: every random draw of a row comes from that row's own seed, so a row's image is the same in any batch."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# The initial latent uses PCG64(seed) itself; sampler step i uses the stream SeedSequence([seed, _STEP, i]).
_STEP = 1


def _row_generator(seed: int, *stream: int) -> np.random.Generator:
    if stream:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *stream])))
    return np.random.Generator(np.random.PCG64(int(seed)))


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal latents of `shape` (C, h, w) per row, drawn with Generator(PCG64(seed)) (SPEC section 1)."""
    return np.stack([_row_generator(s).standard_normal(shape, dtype=np.float32) for s in seeds])


class StepNoise:
    """Fresh noise for sampler step i of each row (ancestral and stochastic samplers)."""

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...]):
        self.seeds = [int(s) for s in seeds]
        self.shape = shape

    def __call__(self, step: int) -> np.ndarray:
        return np.stack(
            [_row_generator(s, _STEP, step).standard_normal(self.shape, dtype=np.float32) for s in self.seeds]
        )
