"""Coop-Diffusion (SPEC section 8): models with other latent spaces and resolutions join one denoising loop.

    helpers = [CoopHelper(sd15_model, weight=0.5, window=(0.0, 0.5))]
    latents = coop_generate(primary, requests, helpers)                 # fused sampling, in the primary's latents
    latents = super_resolve(low_model, high_model, requests, t_switch=500)  # one-stage super-resolution
    images = primary.decode(latents)   # (high_model.decode for super-resolution)

Everything works in sigma space like the samplers (x = x0 + sigma * eps, `diffusion.samplers`). At every step where a
helper B takes part, its guided x0 prediction is carried into the primary A's latent space through pixel space,
P_BA(z) = s_A * Enc_A(Resize(Dec_B(z / s_B))), and mixed into A's prediction before A's sampler uses it:
x0 = x0_A + sum_k w_k (x0_k - x0_A), which is w_A x0_A + sum_k w_k x0_k with w_A = 1 - sum_k w_k. For a fixed x_t,
eps is affine in x0 with weights summing to 1, so this is also the eps fusion of the SPEC. The helper keeps a chain of
its own, x_t^B: the fused x0 is mapped back with P_AB and B's chain takes an Euler step (DDIM, eta = 0) with it.

The split form for the pipeline: `CoopFusion(...).run(conds, handoffs, stop)` runs any range of steps and returns
`Handoff`s whose `state` carries the helpers' chains, so a later stage (another process) continues exactly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from diffusion import buckets
from diffusion.model import Conditioning, GenerationRequest, Handoff, PanGuDraw, Plan

log = logging.getLogger(__name__)

# Noise streams of this module: SeedSequence([seed, _COOP_STREAM, purpose, ...]); diffusion.noise uses stream 1.
_COOP_STREAM = 0x636F6F70
_HANDOVER, _CHAIN_ENTRY, _CONTROL_ANCHOR = 1, 2, 3
# Tolerance of the check that the helpers' weights at one step sum to at most 1.
_WEIGHT_EPS = 1e-6


# ---------------------------------------------------------------- pixels

def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights resampling one axis: bilinear (half-pixel centres, edges clamped) when enlarging,
    area averaging when shrinking (an exact box mean for integer factors), the identity when equal."""
    if n_in == n_out:
        return np.eye(n_out, dtype=np.float64)
    m = np.zeros((n_out, n_in), dtype=np.float64)
    ratio = n_in / n_out
    if n_out > n_in:
        src = np.clip((np.arange(n_out) + 0.5) * ratio - 0.5, 0.0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
        np.add.at(m, (np.arange(n_out), hi), frac)
        return m
    for j in range(n_out):
        a, b = j * ratio, (j + 1) * ratio
        for i in range(int(np.floor(a)), min(int(np.ceil(b)), n_in)):
            m[j, i] = min(b, i + 1) - max(a, i)
    return m / ratio


def resize_pixels(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resample images (B, C, H, W) to `size` = (H', W') with `resize_matrix` on each axis."""
    h, w = pixels.shape[-2:]
    if (h, w) == tuple(size):
        return pixels
    rows = resize_matrix(h, size[0]).astype(np.float32)
    cols = resize_matrix(w, size[1]).astype(np.float32)
    return (rows @ pixels.astype(np.float32) @ cols.T).astype(np.float32)


def images_to_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images (B, H, W, 3) or (H, W, 3) -> float pixels (B, 3, H, W) in [-1, 1], the VAE's input range."""
    if images.ndim == 3:
        images = images[None]
    return (images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(127.5) - np.float32(1.0)).astype(np.float32)


# ---------------------------------------------------------------- latent spaces and bridges

class LatentSpace(Protocol):
    """What a bridge needs of a model's latent space. `decode`/`encode` work on unscaled latents."""

    key: str  # equal keys: the same VAE weights and latent scale, so equal-shaped latents mean the same image
    scale: float
    factor: int  # pixels per latent cell

    def decode(self, latents: np.ndarray) -> np.ndarray: ...  # (B, C, h, w) -> pixels (B, 3, h*f, w*f), float32

    def encode(self, pixels: np.ndarray) -> np.ndarray: ...  # pixels (B, 3, H, W) in [-1, 1] -> posterior mean


class VaeLatentSpace:
    """A loaded model's VAE as a `LatentSpace`, in float: no clipping and no uint8 rounding inside."""

    def __init__(self, model: PanGuDraw):
        if "vae" not in model.nets:
            raise ValueError(f"model {model.identity.get('name')} was loaded without its VAE, which Coop-Diffusion needs")
        self.model = model
        self.scale = float(model.config.vae.scale_factor)
        self.factor = model.config.vae.downsample_factor
        self.key = vae_key(model)

    # The model's own compiled VAE graphs are reused, so a bridge compiles nothing new; `model.decode` and
    # `model.encode_images` are not used because they round to uint8 (see `Bridge`).
    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self.model._per_row(self.model._fwd("vae_decode"), latents.astype(np.float32))

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.model._per_row(self.model._fwd("vae_encode"), pixels.astype(np.float32))


_spaces: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def latent_space(model: PanGuDraw) -> VaeLatentSpace:
    """The model's `VaeLatentSpace`, built once per model object (its key hashes the VAE's weights)."""
    space = _spaces.get(model)
    if space is None:
        space = _spaces[model] = VaeLatentSpace(model)
    return space


def vae_key(model: PanGuDraw) -> str:
    """sha256 of the VAE's config, latent scale and every parameter (name, shape, dtype, bytes), first 16 hex digits."""
    digest = hashlib.sha256(model.config.vae.model_dump_json().encode())
    for name, param in sorted(model.nets["vae"].parameters_and_names(), key=lambda item: item[0]):
        value = param.asnumpy()
        digest.update(json.dumps([name, list(value.shape), str(value.dtype)]).encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Bridge:
    """P(z) = s_to * Enc_to(Resize(clip(Dec_from(z / s_from)))): scaled latents of one space and shape to another's.

    Float decode and encode, not the uint8 `decode`/`encode_images`: the bridge runs at every fused step, and rounding
    to 8 bits would add up to half a grey level of quantisation noise each time and flatten the smooth, low-contrast
    x0 predictions of the early steps. The decoded image is clipped to [-1, 1] (`clip`), the range of every image the
    encoder was trained on: early x0 predictions overshoot it. A bridge between equal keys and shapes is the identity.
    """

    source: LatentSpace
    target: LatentSpace
    source_shape: tuple[int, int, int]
    target_shape: tuple[int, int, int]
    clip: bool = True

    @property
    def identity(self) -> bool:
        return self.source.key == self.target.key and tuple(self.source_shape) == tuple(self.target_shape)

    @property
    def target_pixels(self) -> tuple[int, int]:
        return self.target_shape[1] * self.target.factor, self.target_shape[2] * self.target.factor

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        if self.identity:
            return latents
        return self.from_pixels(self.to_pixels(latents))

    def to_pixels(self, latents: np.ndarray) -> np.ndarray:
        """Dec_from(z / s_from), clipped: the image in the source's resolution (B, 3, H, W)."""
        pixels = self.source.decode((latents / np.float32(self.source.scale)).astype(np.float32))
        return np.clip(pixels, -1.0, 1.0) if self.clip else pixels

    def from_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """s_to * Enc_to(Resize(pixels)): images of any size into the target's latents."""
        resized = resize_pixels(pixels, self.target_pixels)
        return (self.target.encode(resized) * np.float32(self.target.scale)).astype(np.float32)


def bridge(source: PanGuDraw, target: PanGuDraw, source_shape: tuple[int, int, int],
           target_shape: tuple[int, int, int], *, clip: bool = True) -> Bridge:
    """The bridge from `source`'s latents of `source_shape` to `target`'s of `target_shape`."""
    return Bridge(latent_space(source), latent_space(target), tuple(source_shape), tuple(target_shape), clip)


# ---------------------------------------------------------------- helpers

@dataclass(frozen=True, eq=False)
class CoopHelper:
    """A model that joins the primary's denoising loop.

    `window` is a fraction of the row's sampling steps: step i of N takes part when start <= i / N < end (the
    manifest's `helper_window`). `control_image` (uint8 (H, W, 3), or (B, H, W, 3) one per row) makes this a control
    helper. A control model (`config.control_channels` > 0, trained to take an image) reads the image's layout map
    beside its latents (diffusion.control); any other model gets the control image in its latents, noised to each
    step's sigma, as its input, so its x0 prediction carries the control's layout under its own prompt. `prompt`,
    `negative_prompt` and `guidance_scale` default to the row's.
    """

    model: PanGuDraw
    weight: float = 0.5
    window: tuple[float, float] = (0.0, 1.0)
    control_image: np.ndarray | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None

    def __post_init__(self):
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"helper weight must be in 0..1, got {self.weight}")
        start, end = self.window
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"helper window must satisfy 0 <= start < end <= 1, got {self.window}")
        if self.control_image is not None:
            img = self.control_image
            if img.dtype != np.uint8 or img.ndim not in (3, 4) or img.shape[-1] != 3:
                raise ValueError(f"control image must be uint8 (H, W, 3) or (B, H, W, 3), got {img.dtype} {img.shape}")

    def takes_part(self, step: int, steps: int) -> bool:
        """Whether step `step` of `steps` fuses this helper (a helper of weight 0 never runs)."""
        return self.weight > 0.0 and self.window[0] <= step / steps < self.window[1]

    def request_for(self, request: GenerationRequest, plan: Plan) -> GenerationRequest:
        """The row as this helper runs it: the primary's bucket at a size the helper makes, its own texts if set.

        Its sampler is Euler: the helper's own sampler never steps (its chain takes the fused step), so nothing
        stochastic is drawn.
        """
        size = buckets.choose_size(self.model.config.bucket_scales, plan.size.width, plan.size.height)
        return dataclasses.replace(
            request,
            prompt=request.prompt if self.prompt is None else self.prompt,
            negative_prompt=request.negative_prompt if self.negative_prompt is None else self.negative_prompt,
            guidance_scale=request.guidance_scale if self.guidance_scale is None else self.guidance_scale,
            width=size.width, height=size.height, aspect=None, sampler="euler",
        )


def _row_noise(seeds: Sequence[int], shape: tuple[int, ...], *stream: int) -> np.ndarray:
    return np.stack([
        np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(s), _COOP_STREAM, *stream])))
        .standard_normal(shape, dtype=np.float32)
        for s in seeds
    ])


def handover_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> np.ndarray:
    """The fresh noise xi of one-stage super-resolution, per row from the row's seed."""
    return _row_noise(seeds, shape, _HANDOVER)


def check_same_schedule(primary: PanGuDraw, other: PanGuDraw) -> None:
    """Coop-Diffusion pairs steps one to one, so both models must share the noise schedule."""
    a, b = primary.schedule, other.schedule
    if a.num_train_timesteps != b.num_train_timesteps or not np.allclose(a.alphas_cumprod, b.alphas_cumprod):
        raise ValueError(
            f"model {other.identity.get('name')} has another noise schedule than {primary.identity.get('name')}; "
            "Coop-Diffusion needs the same schedule (timesteps are paired one to one)"
        )


def _batch_plan(model: PanGuDraw, requests: Sequence[GenerationRequest]) -> Plan:
    plans = [model.plan(r) for r in requests]
    keys = {model.shape_key(p, r) for p, r in zip(plans, requests)}
    if len(keys) != 1:
        raise ValueError(f"a sampling batch needs one size, step count and sampler; got {sorted(keys)}")
    return plans[0]


class _Link:
    """One helper's part in one batch: its requests, conditioning, bridges, control latents and chain keys."""

    def __init__(self, index: int, helper: CoopHelper, primary: PanGuDraw, plan: Plan,
                 requests: Sequence[GenerationRequest], conds: Sequence[Conditioning] | None, clip: bool):
        self.index = index
        self.helper = helper
        self.model = helper.model
        check_same_schedule(primary, self.model)
        self.requests = [helper.request_for(r, plan) for r in requests]
        self.plan = _batch_plan(self.model, self.requests)
        if not np.array_equal(self.plan.timesteps, plan.timesteps):
            raise ValueError("a helper must run the primary's timesteps")
        self.conds = list(conds) if conds is not None else self.model.encode(self.requests)
        self.seeds = [r.seed for r in requests]
        self.to_primary = bridge(self.model, primary, self.plan.latent_shape, plan.latent_shape, clip=clip)
        self.from_primary = bridge(primary, self.model, plan.latent_shape, self.plan.latent_shape, clip=clip)
        self.control_latent = None
        self.control_input = False
        if helper.control_image is not None:
            images = helper.control_image if helper.control_image.ndim == 4 else helper.control_image[None]
            if len(images) == 1:
                images = np.repeat(images, len(requests), axis=0)
            elif len(images) != len(requests):
                raise ValueError(f"{len(images)} control images for {len(requests)} rows")
            if self.model.config.control_channels:
                # A control model reads the image itself: its layout map goes in with the latents every step.
                self.conds = self.model.with_control(self.requests, self.conds, list(images))
                self.control_input = True
            else:
                # Any other model sees the control through its input latents: the image in its latent space,
                # noised to each step's sigma with noise fixed per row.
                helper_space = latent_space(self.model)
                size = (self.plan.latent_shape[1] * helper_space.factor,
                        self.plan.latent_shape[2] * helper_space.factor)
                pixels = resize_pixels(images_to_pixels(images), size)
                self.control_latent = (helper_space.encode(pixels) * np.float32(helper_space.scale)).astype(np.float32)
                self.anchor_noise = _row_noise(self.seeds, self.plan.latent_shape, _CONTROL_ANCHOR, index)
        self.latent_key = f"coop{index}_latent"
        self.step_key = f"coop{index}_step"

    @property
    def shares_chain(self) -> bool:
        """A helper in the primary's own latent space (and no control) denoises the primary's latents directly."""
        return self.to_primary.identity and self.control_latent is None

    @property
    def keeps_chain(self) -> bool:
        return not self.shares_chain and self.control_latent is None

    def denoise(self, x: np.ndarray, step: int) -> np.ndarray:
        """The helper's guided x0 prediction for its latents `x` at `step` (its own classifier-free guidance)."""
        captured: dict[str, np.ndarray] = {}

        def capture(x_cur: np.ndarray, i: int, denoised: np.ndarray) -> np.ndarray:
            captured["x0"] = denoised
            return denoised

        self.model.run_steps(self.requests, self.conds, x, range(step, step + 1), {}, fuse=capture)
        return captured["x0"]


class CoopFusion:
    """The fuse hook of one sampling batch (`PanGuDraw.run_steps(..., fuse=)`), and the loops that use it.

    `calls[k]` lists the steps at which helper k ran, in this object's lifetime. `state` is the sampler state dict
    that also holds each helper's chain (`coop<k>_latent`, `coop<k>_step`, one entry per row), so it travels in
    `Handoff.state` between pipeline stages.
    """

    def __init__(self, primary: PanGuDraw, requests: Sequence[GenerationRequest], helpers: Sequence[CoopHelper], *,
                 helper_conds: Sequence[Sequence[Conditioning] | None] | None = None, clip_pixels: bool = True):
        self.primary = primary
        self.requests = list(requests)
        self.helpers = list(helpers)
        self.plan = _batch_plan(primary, self.requests)
        self.steps = len(self.plan.timesteps)
        self.sigmas = primary.schedule.sampling_sigmas(self.plan.timesteps)
        for i in range(self.steps):
            total = sum(h.weight for h in self.helpers if h.takes_part(i, self.steps))
            if total > 1.0 + _WEIGHT_EPS:
                raise ValueError(f"helper weights at step {i} sum to {total:g}; the fused weights must sum to 1, "
                                 "so the helpers' together may not exceed 1")
        helper_conds = list(helper_conds) if helper_conds is not None else [None] * len(self.helpers)
        if len(helper_conds) != len(self.helpers):
            raise ValueError(f"{len(helper_conds)} conditioning lists for {len(self.helpers)} helpers")
        self.links = [_Link(k, h, primary, self.plan, self.requests, c, clip_pixels)
                      for k, (h, c) in enumerate(zip(self.helpers, helper_conds))]
        self.state: dict[str, np.ndarray] = {}
        self.calls: list[list[int]] = [[] for _ in self.helpers]
        log.debug("coop fusion: %d rows, %d helpers (%s)", len(self.requests), len(self.links),
                  ", ".join("identity" if link.to_primary.identity else "pixel" for link in self.links))

    # ------------------------------------------------------------ the hook

    def __call__(self, x: np.ndarray, i: int, denoised: np.ndarray) -> np.ndarray:
        active = [link for link in self.links if link.helper.takes_part(i, self.steps)]
        if not active:
            return denoised
        sigma, sigma_next = np.float32(self.sigmas[i]), np.float32(self.sigmas[i + 1])
        delta = np.zeros_like(denoised)
        inputs = {}
        primary_pixels = None  # Dec_A(x0_A), shared by the helpers whose chains enter at this step
        for link in active:
            if link.control_latent is not None:
                x_b = link.control_latent + sigma * link.anchor_noise
            elif link.shares_chain:
                x_b = x
            elif self._chain_at(link, i):
                x_b = self.state[link.latent_key]
            else:
                # The chain starts here: the primary's x0 in the helper's latents, noised to this step's sigma.
                if primary_pixels is None:
                    primary_pixels = link.from_primary.to_pixels(denoised)
                entry_noise = _row_noise(link.seeds, link.plan.latent_shape, _CHAIN_ENTRY, link.index, i)
                x_b = link.from_primary.from_pixels(primary_pixels) + sigma * entry_noise
            x0_b = link.to_primary(link.denoise(x_b.astype(np.float32), i))
            # d + w (x0_b - d): exactly d when the helper predicts d, whatever the weight.
            delta = delta + np.float32(link.helper.weight) * (x0_b - denoised)
            inputs[link.index] = x_b
            self.calls[link.index].append(i)
        fused = (denoised + delta).astype(np.float32)
        fused_pixels = None  # Dec_A(fused), shared by every helper chain
        for link in active:
            if not link.keeps_chain:
                continue
            if i + 1 >= self.steps or not link.helper.takes_part(i + 1, self.steps):
                self.state.pop(link.latent_key, None)
                self.state.pop(link.step_key, None)
                continue
            if fused_pixels is None:
                fused_pixels = link.from_primary.to_pixels(fused)
            x0_b = link.from_primary.from_pixels(fused_pixels)
            x_b = inputs[link.index]
            self.state[link.latent_key] = (x0_b + sigma_next * ((x_b - x0_b) / sigma)).astype(np.float32)
            self.state[link.step_key] = np.full(len(x), i + 1, dtype=np.int64)
        return fused

    def _chain_at(self, link: _Link, step: int) -> bool:
        marks = self.state.get(link.step_key)
        return marks is not None and link.latent_key in self.state and bool(np.all(marks == step))

    # ------------------------------------------------------------ loops

    def run(self, conds: Sequence[Conditioning], handoffs: Sequence[Handoff] | None, stop: int) -> list[Handoff]:
        """Run the primary's steps from `handoffs` (None: from each row's initial noise at step 0) up to `stop`."""
        if not 0 <= stop <= self.steps:
            raise ValueError(f"stop must be in 0..{self.steps}, got {stop}")
        if handoffs is None:
            start, x = 0, self.primary.initial_latents(self.requests)
            self.state = {}
        else:
            if len(handoffs) != len(self.requests):
                raise ValueError(f"{len(handoffs)} handoffs for {len(self.requests)} rows")
            start = handoffs[0].step
            if any(h.step != start for h in handoffs):
                raise ValueError("the handoffs of one batch must be at the same step")
            x = np.stack([h.latent for h in handoffs])
            self.state = {k: np.stack([h.state[k] for h in handoffs]) for k in handoffs[0].state}
        if stop < start:
            raise ValueError(f"cannot run from step {start} back to step {stop}")
        x = self.primary.run_steps(self.requests, conds, x, range(start, stop), self.state, fuse=self)
        return [Handoff(x[r], stop, {k: v[r] for k, v in self.state.items()}) for r in range(len(self.requests))]

    def sample(self, conds: Sequence[Conditioning]) -> np.ndarray:
        """Every step from noise: clean latents (B, C, h, w) in the primary's latent space."""
        return np.stack([h.latent for h in self.run(conds, None, self.steps)])

    def structure(self, conds: Sequence[Conditioning]) -> list[Handoff]:
        """The structure generator's steps (like `PanGuDraw.sample_structure`), the helpers' chains in the state."""
        return self.run(conds, None, self.plan.split)

    def texture(self, conds: Sequence[Conditioning], handoffs: Sequence[Handoff]) -> np.ndarray:
        """The remaining steps from `structure`'s handoffs (possibly made by another process)."""
        return np.stack([h.latent for h in self.run(conds, handoffs, self.steps)])

    def record(self) -> list[dict]:
        """What was fused, per helper, for result rows."""
        return [{
            "model": dict(link.model.identity),
            "weight": link.helper.weight,
            "window": list(link.helper.window),
            "bridge": "identity" if link.to_primary.identity else "pixel",
            "helper_size": [link.plan.size.width, link.plan.size.height],
            "control": link.control_latent is not None or link.control_input,
            "control_mode": "input" if link.control_input else "latents" if link.control_latent is not None else None,
            "steps": list(self.calls[link.index]),
        } for link in self.links]


def coop_sample(primary: PanGuDraw, requests: Sequence[GenerationRequest], conds: Sequence[Conditioning],
                helpers: Sequence[CoopHelper], **kwargs) -> np.ndarray:
    """Fused sampling of one batch (one shape) from noise; clean latents in the primary's latent space."""
    return CoopFusion(primary, requests, helpers, **kwargs).sample(conds)


def coop_generate(primary: PanGuDraw, requests: Sequence[GenerationRequest], helpers: Sequence[CoopHelper],
                  **kwargs) -> np.ndarray:
    """`coop_sample` with the primary's text encoding done here."""
    return coop_sample(primary, requests, primary.encode(requests), helpers, **kwargs)


# ---------------------------------------------------------------- one-stage super-resolution

@dataclass(frozen=True)
class SuperResolutionPlan:
    """Who runs which step: the low-resolution model steps [0, handover_step), the high-resolution one the rest.

    The low model runs every step whose timestep is >= t_switch; the high model starts at the first timestep below
    it, from x = Up(x0) + handover_sigma * xi, where handover_sigma is that step's sigma.
    """

    low_requests: tuple[GenerationRequest, ...]
    high_requests: tuple[GenerationRequest, ...]
    low_shape: tuple[int, int, int]
    high_shape: tuple[int, int, int]
    steps: int
    handover_step: int
    handover_timestep: int | None  # None when the low model runs every step
    handover_sigma: float
    output_size: tuple[int, int]  # (width, height) of the high model's image


def plan_super_resolution(low: PanGuDraw, high: PanGuDraw, requests: Sequence[GenerationRequest],
                          t_switch: int = 500, *, output_size: tuple[int, int] | None = None) -> SuperResolutionPlan:
    """Plan one-stage super-resolution of `requests` (sized for the low model); `output_size` = (width, height),
    by default the high model's size of the same aspect bucket."""
    check_same_schedule(low, high)
    low_plan = _batch_plan(low, requests)
    if output_size is None:
        output_size = buckets.bucket_sizes(high.config.bucket_scales[0])[low_plan.size.bucket]
    width, height = output_size
    high_requests = [dataclasses.replace(r, width=width, height=height, aspect=None) for r in requests]
    high_plan = _batch_plan(high, high_requests)
    if (high_plan.size.width, high_plan.size.height) != (width, height):
        raise ValueError(f"the high-resolution model does not make {width}x{height} images; "
                         f"the nearest it makes is {high_plan.size.width}x{high_plan.size.height}")
    timesteps = low_plan.timesteps
    k = int((timesteps >= t_switch).sum())
    if k == 0:
        raise ValueError(f"t_switch {t_switch} is above every timestep: the low-resolution model would run no step")
    sigmas = low.schedule.sampling_sigmas(timesteps)
    return SuperResolutionPlan(
        low_requests=tuple(requests), high_requests=tuple(high_requests),
        low_shape=low_plan.latent_shape, high_shape=high_plan.latent_shape, steps=len(timesteps),
        handover_step=k, handover_timestep=int(timesteps[k]) if k < len(timesteps) else None,
        handover_sigma=float(sigmas[k]), output_size=(width, height),
    )


def low_stage(low: PanGuDraw, sr: SuperResolutionPlan, conds: Sequence[Conditioning] | None = None) -> np.ndarray:
    """The low-resolution model alone for the steps with t >= t_switch; returns its x0 prediction of the last one."""
    conds = conds if conds is not None else low.encode(sr.low_requests)
    last: dict[str, np.ndarray] = {}

    def keep_x0(x: np.ndarray, i: int, denoised: np.ndarray) -> np.ndarray:
        last["x0"] = denoised
        return denoised

    x = low.initial_latents(sr.low_requests)
    low.run_steps(sr.low_requests, conds, x, range(0, sr.handover_step), {}, fuse=keep_x0)
    return last["x0"]


def handover(low: PanGuDraw, high: PanGuDraw, sr: SuperResolutionPlan, x0_low: np.ndarray, *,
             clip: bool = True) -> np.ndarray:
    """x = Up(x0) + sigma * xi: the low model's x0 decoded, upsampled and encoded into the high model's latents, with
    fresh per-row noise at the handover step's sigma (sigma space)."""
    x0_high = bridge(low, high, sr.low_shape, sr.high_shape, clip=clip)(x0_low)
    xi = handover_noise([r.seed for r in sr.high_requests], sr.high_shape)
    return (x0_high + np.float32(sr.handover_sigma) * xi).astype(np.float32)


def high_stage(high: PanGuDraw, sr: SuperResolutionPlan, x: np.ndarray, conds: Sequence[Conditioning] | None = None,
               helpers: Sequence[CoopHelper] = ()) -> np.ndarray:
    """The high-resolution model's remaining steps from the handover latents; helpers may join (multi-control)."""
    conds = conds if conds is not None else high.encode(sr.high_requests)
    if not helpers:
        return high.run_steps(sr.high_requests, conds, x, range(sr.handover_step, sr.steps), {})
    fusion = CoopFusion(high, sr.high_requests, helpers)
    start = [Handoff(x[r], sr.handover_step) for r in range(len(x))]
    return np.stack([h.latent for h in fusion.run(conds, start, sr.steps)])


def super_resolve(low: PanGuDraw, high: PanGuDraw, requests: Sequence[GenerationRequest], t_switch: int = 500, *,
                  output_size: tuple[int, int] | None = None, helpers: Sequence[CoopHelper] = ()) -> np.ndarray:
    """One-stage super-resolution: clean latents of the high-resolution model (decode with `high.decode`)."""
    sr = plan_super_resolution(low, high, requests, t_switch, output_size=output_size)
    x0_low = low_stage(low, sr)
    return high_stage(high, sr, handover(low, high, sr, x0_low), helpers=helpers)
