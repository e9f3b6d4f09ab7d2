"""Classifier-free guidance with PanGu-Draw's quantifiable style branches (SPEC section 4)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# A style branch is the prompt prefixed by a rare trigger character and a space.
STYLE_TRIGGERS = {"aesthetic": "義 ", "anime": "饅 ", "photography": "霙 "}
STYLES = tuple(STYLE_TRIGGERS)


def active_branches(style_scales: dict[str, float]) -> tuple[str, ...]:
    """Branches a row evaluates each step: unconditional, conditional, then each style whose scale is above 0."""
    return ("uncond", "cond", *(k for k in STYLES if style_scales.get(k, 0.0) > 0))


def branch_prompt(branch: str, prompt: str, negative_prompt: str) -> str:
    if branch == "uncond":
        return negative_prompt
    if branch == "cond":
        return prompt
    return STYLE_TRIGGERS[branch] + prompt


def combine(outputs: np.ndarray, branches: Sequence[str], guidance_scale: float, style_scales: dict[str, float]) -> np.ndarray:
    """D = D_u + s (D_c - D_u) + sum_k s_k (D_ck - D_c), for one row's branch outputs stacked on axis 0.

    Linear in D, so it applies equally to x0 predictions and to eps predictions.
    """
    by_name = dict(zip(branches, outputs))
    uncond, cond = by_name["uncond"], by_name["cond"]
    out = uncond + guidance_scale * (cond - uncond)
    for style in branches[2:]:
        out = out + style_scales[style] * (by_name[style] - cond)
    return out
