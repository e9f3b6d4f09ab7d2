"""Image control for models trained to take one: a layout map concatenated to the UNet's input latents.

A control model (`ModelConfig.control_channels` = 1) reads, at every step, one extra input channel beside its
latents: the *layout* of a control image at latent resolution. The layout is the image's foreground, the pixels
farther than `FOREGROUND_DISTANCE` (RGB) from the median colour of its border, so one rule serves a layout sketch
(a grey shape on black, `evaluation.layout_sketch`) and a picture (the synthetic scenes: a shape on a plain
background). Each latent cell holds the share of its pixels that are foreground, mapped to [-1, 1]; a row with no
control image gets the all-zero map, which the trainer teaches as "no control" (`control_dropout`).

Training derives the control from each training image by the same rule, as ControlNet derives its edge maps from
its training images, so a model learns to put the shape where the map is.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

FOREGROUND_DISTANCE = 60.0


def foreground_mask(image: np.ndarray, distance: float = FOREGROUND_DISTANCE) -> np.ndarray:
    """Pixels of a uint8 (H, W, 3) image farther than `distance` (RGB) from the median colour of its border."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    return np.linalg.norm(image.astype(np.float32) - np.median(border, axis=0), axis=-1) > distance


def layout_map(image: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """The (1, h, w) float32 control map of one uint8 (H, W, 3) image: foreground share per latent cell, in [-1, 1].

    The image may have any size: its mask is resized to the latent grid by area (box) averaging."""
    h, w = latent_hw
    mask = foreground_mask(image).astype(np.float32)
    H, W = mask.shape
    if H % h == 0 and W % w == 0:
        share = mask.reshape(h, H // h, w, W // w).mean(axis=(1, 3))
    else:
        share = np.asarray(Image.fromarray(mask, mode="F").resize((w, h), Image.Resampling.BOX), np.float32)
    return (2.0 * np.clip(share, 0.0, 1.0) - 1.0)[None].astype(np.float32)


def layout_maps(images: Sequence[np.ndarray] | np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """`layout_map` of each image: (B, 1, h, w) float32."""
    return np.stack([layout_map(np.asarray(img), latent_hw) for img in images])


def no_control(count: int, channels: int, latent_hw: tuple[int, int]) -> np.ndarray:
    """The map of rows without a control image (what `control_dropout` trains)."""
    return np.zeros((count, channels, *latent_hw), np.float32)
