"""The DDPM noise schedule, the trailing timestep spacing, and the structure/texture split (SPEC sections 1-2)."""
from __future__ import annotations

from enum import Enum

import numpy as np


class SplitRule(str, Enum):
    """How steps are assigned to the structure and texture generators."""

    REFERENCE = "reference"  # the model for step i is chosen from step i-1's timestep (the released code's one-step lag)
    EXACT = "exact"  # the structure generator runs exactly the steps with t >= T_s


def alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """alpha_bar_t of the scaled-linear schedule: betas = linspace(sqrt(b0), sqrt(b1), T)^2."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def sigmas_from_alphas(acp: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the noise level in sigma (variance-exploding) space."""
    return np.sqrt((1.0 - acp) / acp)


def sampling_timesteps(steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """Descending integer timesteps with trailing spacing: linspace(T-1, 0, N, endpoint=False)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    return np.linspace(num_train_timesteps - 1, 0, steps, endpoint=False).astype(np.int64)


def split_index(timesteps: np.ndarray, switch_timestep: int, rule: SplitRule | str = SplitRule.REFERENCE) -> int:
    """Number of leading steps that the structure generator runs; the texture generator runs the rest."""
    rule = SplitRule(rule)
    high = timesteps >= switch_timestep
    if rule is SplitRule.EXACT:
        return int(high.sum())
    # Step 0 always belongs to the structure model; step i>0 follows the timestep of step i-1.
    chosen_from = np.concatenate([[True], high[:-1]])
    return int(chosen_from.sum())


def x0_from_output(output: np.ndarray, x: np.ndarray, sigma: float, prediction: str = "epsilon") -> np.ndarray:
    """The x0 prediction at sigma-space latents x = x0 + sigma * eps from a UNet's (guided) output.

    "epsilon": x0 = x - sigma * eps. "v": with the UNet's input x / sqrt(sigma^2 + 1) = sqrt(a) x0 + sqrt(1 - a) eps
    and v = sqrt(a) eps - sqrt(1 - a) x0, x0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v. Both are affine in
    the output with fixed weights, so guidance may combine the outputs before this.
    """
    sigma = np.float32(sigma)
    if prediction == "epsilon":
        return (x - sigma * output).astype(np.float32)
    if prediction == "v":
        s2 = sigma * sigma + np.float32(1.0)
        return (x / s2 - (sigma / np.sqrt(s2)) * output).astype(np.float32)
    raise ValueError(f"unknown prediction {prediction!r}")


class Schedule:
    """The schedule of one model: alpha_bar and sigma for every training timestep."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        self.num_train_timesteps = num_train_timesteps
        self.alphas_cumprod = alphas_cumprod(num_train_timesteps, beta_start, beta_end)
        self.sigmas = sigmas_from_alphas(self.alphas_cumprod)

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timesteps(self, steps: int) -> np.ndarray:
        return sampling_timesteps(steps, self.num_train_timesteps)

    def sampling_sigmas(self, timesteps: np.ndarray) -> np.ndarray:
        """sigma at each sampling timestep, with a final 0 appended (the clean image)."""
        return np.append(self.sigmas[timesteps], 0.0)
