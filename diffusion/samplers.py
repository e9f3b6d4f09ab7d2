"""Samplers: each a short function with one signature, k-diffusion style, working in sigma space on NumPy arrays.

    sampler(denoise, x, sigmas, steps, state, noise, callback=None) -> x

- `denoise(x, i)` returns the denoised prediction x0 for the latents `x` (sigma space: x = x0 + sigma_i * eps) at step i.
- `sigmas` holds the N sampling sigmas plus a final 0; `steps` is the range of step indices to run, so sampling can be
  cut into consecutive calls (the structure steps, then the texture steps) that give exactly the result of one call.
- `state` is a dict that carries what a multistep method needs from one call to the next (updated in place).
- `noise(i)` gives per-row fresh noise for step i (stochastic samplers only).
- `callback(i, x, denoised)`, when given, is called after every step.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

Denoiser = Callable[[np.ndarray, int], np.ndarray]


def euler(denoise, x, sigmas, steps, state, noise, callback=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 without churn); equals DDIM with eta=0."""
    for i in steps:
        denoised = denoise(x, i)
        eps = (x - denoised) / sigmas[i]
        x = (denoised + sigmas[i + 1] * eps).astype(np.float32)
        if callback:
            callback(i, x, denoised)
    return x


def ddim(denoise, x, sigmas, steps, state, noise, callback=None, eta: float = 0.0):
    """DDIM (Song et al. 2021, eq. 12) written in sigma space; eta=0 is deterministic and equal to `euler`."""
    for i in steps:
        denoised = denoise(x, i)
        s, s_next = sigmas[i], sigmas[i + 1]
        eps = (x - denoised) / s
        a_t, a_next = 1.0 / (1.0 + s * s), 1.0 / (1.0 + s_next * s_next)
        sigma_ddim = eta * np.sqrt((1.0 - a_next) / (1.0 - a_t) * (1.0 - a_t / a_next)) if s_next > 0 else 0.0
        direction = np.sqrt(max(1.0 - a_next - sigma_ddim**2, 0.0) / a_next)
        x = denoised + direction * eps
        if sigma_ddim > 0:
            x = x + sigma_ddim / np.sqrt(a_next) * noise(i)
        x = x.astype(np.float32)
        if callback:
            callback(i, x, denoised)
    return x


def euler_ancestral(denoise, x, sigmas, steps, state, noise, callback=None, eta: float = 1.0):
    """Ancestral Euler (k-diffusion's sample_euler_ancestral): step down to sigma_down, then add noise of sigma_up."""
    for i in steps:
        denoised = denoise(x, i)
        s, s_next = sigmas[i], sigmas[i + 1]
        sigma_up = min(s_next, eta * np.sqrt(max(s_next**2 * (s**2 - s_next**2) / s**2, 0.0)))
        sigma_down = np.sqrt(s_next**2 - sigma_up**2)
        x = denoised + sigma_down * (x - denoised) / s
        if s_next > 0 and sigma_up > 0:
            x = x + sigma_up * noise(i)
        x = x.astype(np.float32)
        if callback:
            callback(i, x, denoised)
    return x


def dpmpp_2m(denoise, x, sigmas, steps, state, noise, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second-order multistep in log-sigma, using the previous x0 prediction.

    `state["old_denoised"]` holds the previous step's x0 so the method continues exactly across calls.
    """
    for i in steps:
        denoised = denoise(x, i)
        s, s_next = sigmas[i], sigmas[i + 1]
        old = state.get("old_denoised")
        if s_next == 0:
            x = denoised
        else:
            h = np.log(s) - np.log(s_next)
            if old is None or i == 0:
                d = denoised
            else:
                h_last = np.log(sigmas[i - 1]) - np.log(s)
                r = h_last / h
                d = (1.0 + 1.0 / (2.0 * r)) * denoised - (1.0 / (2.0 * r)) * old
            x = (s_next / s) * x - np.expm1(-h) * d
        x = x.astype(np.float32)
        state["old_denoised"] = denoised.astype(np.float32)
        if callback:
            callback(i, x, denoised)
    return x


SAMPLERS: dict[str, Callable] = {
    "euler": euler,
    "ddim": ddim,
    "euler_ancestral": euler_ancestral,
    "dpmpp_2m": dpmpp_2m,
}

# Samplers whose state must travel with the latents between the structure and texture calls.
STATEFUL = {"dpmpp_2m": ("old_denoised",)}


def get_sampler(name: str) -> Callable:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}") from None
