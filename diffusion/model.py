"""The PanGu-Draw model object: prompts in, images out, in stages the pipeline can run on different devices.

    model = PanGuDraw.load("path/to/model")          # or PanGuDraw.load(path, components={"structure"})
    conds = model.encode(requests)                    # both text encoders, every guidance branch, once per row
    handoffs = model.sample_structure(requests, conds)    # structure UNet: the steps with t >= T_s
    latents = model.sample_texture(requests, conds, handoffs)  # texture UNet: the remaining steps
    images = model.decode(latents)                    # VAE -> uint8 (B, H, W, 3)

`generate(requests)` does all of it. A batch passed to the sampling calls must share one `shape_key`
(size, steps, sampler); `generate` groups rows itself. Every row's noise comes from its own seed, so a row gives
the same image in any batch, and the two sampling calls give exactly the result of one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mindspore as ms
import numpy as np

from diffusion import buckets, guidance, noise, runtime, samplers
from diffusion.config import PRESETS, ModelConfig
from diffusion.schedule import Schedule, SplitRule, split_index, x0_from_output
from schemas.errors import UserError

log = logging.getLogger(__name__)

MODEL_FORMAT = "pangudraw-model"
MODEL_FORMAT_VERSION = 1
COMPONENTS = frozenset({"text", "structure", "texture", "vae"})
# Files of our model directory format, per component.
WEIGHT_FILES = {
    "structure_unet": "structure_unet.safetensors",
    "texture_unet": "texture_unet.safetensors",
    "vae": "vae.safetensors",
    "text_encoder_1": "text_encoder_1.safetensors",
    "text_encoder_2": "text_encoder_2.safetensors",
}
TOKENIZER_DIRS = {"text_encoder_1": "tokenizer_1", "text_encoder_2": "tokenizer_2"}


# fuse(x, step, denoised) -> denoised: a hook that changes the guided x0 prediction of every step.
Fuse = Callable[[np.ndarray, int, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class GenerationRequest:
    """One image to make: the prompt and every parameter that changes its pixels."""

    prompt: str
    seed: int
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    aspect: str | None = None
    steps: int = 40
    sampler: str = "euler"
    guidance_scale: float = 6.0
    aesthetic_scale: float = 4.0
    anime_scale: float = 0.0
    photography_scale: float = 0.0

    def style_scales(self) -> dict[str, float]:
        return {"aesthetic": self.aesthetic_scale, "anime": self.anime_scale, "photography": self.photography_scale}


@dataclass(frozen=True)
class Plan:
    """What the model will do for a request: size, bucket, timesteps and the structure/texture split."""

    size: buckets.SizeChoice
    latent_shape: tuple[int, int, int]
    timesteps: np.ndarray = field(compare=False)
    split: int
    branches: tuple[str, ...]

    @property
    def structure_steps(self) -> range:
        return range(0, self.split)

    @property
    def texture_steps(self) -> range:
        return range(self.split, len(self.timesteps))


@dataclass
class Conditioning:
    """One row's encoded guidance branches: cross-attention context and label-embedding input per branch."""

    branches: tuple[str, ...]
    context: np.ndarray  # (branches, tokens, context_dim) float32
    y: np.ndarray  # (branches, adm_in_channels) float32
    # A control model's layout map (control_channels, h, w) at the row's latent size (diffusion.control); None: no
    # control image (the all-zero map is used). Every guidance branch sees the same map.
    control: np.ndarray | None = None


@dataclass
class Handoff:
    """One row's sampling state after `step` steps: what the texture stage continues from."""

    latent: np.ndarray  # (C, h, w) float32, sigma-space latent
    step: int
    state: dict[str, np.ndarray] = field(default_factory=dict)


class PanGuDraw:
    """A loaded PanGu-Draw model (all of its components, or the ones one pipeline stage needs)."""

    def __init__(self, config: ModelConfig, *, split_rule: SplitRule | str = SplitRule.REFERENCE,
                 dtype: str = "float32", graph: bool = True, identity: dict | None = None,
                 batch_invariant: bool = True):
        self.config = config
        # Matrix kernels round differently depending on a row's position in a batch, so by default every network
        # call holds one row (with its guidance branches): a row then gives the same bytes in any batch. False fuses
        # the rows of a batch into one call: faster on accelerators, equal only up to float rounding.
        self.batch_invariant = batch_invariant
        self.split_rule = SplitRule(split_rule)
        self.dtype_name = dtype
        self.dtype = runtime.resolve_dtype(dtype)
        self.graph = graph
        self.schedule = Schedule(config.num_train_timesteps, config.beta_start, config.beta_end)
        self.identity = identity or {"name": config.name, "hash": None}
        self.trained = True
        self.tokenizers: dict[str, object] = {}
        self.nets: dict[str, ms.nn.Cell] = {}
        self._forward: dict[str, Callable] = {}

    # ------------------------------------------------------------------ construction

    @classmethod
    def random(cls, config: ModelConfig, tokenizers: dict[str, object], *, seed: int = 0,
               components: Iterable[str] = COMPONENTS, **kwargs) -> "PanGuDraw":
        """A model with freshly initialised weights (deterministic for a seed); its images are noise until trained."""
        model = cls(config, **kwargs)
        model.identity = {"name": config.name, "hash": f"random-{seed}"}
        model.trained = False
        ms.set_seed(seed)
        model._build(set(components), tokenizers)
        return model

    @classmethod
    def load(cls, path: str | Path | None = None, *, components: Iterable[str] = COMPONENTS,
             device: runtime.Device = "cpu", **kwargs) -> "PanGuDraw":
        """Load a model directory (`model.json` + weights + tokenizer files); None = the shipped tiny model."""
        from diffusion import checkpoints, tokenizers as tok

        runtime.configure(device)
        root = Path(path) if path is not None else default_model_dir()
        manifest = read_model_manifest(root)
        config = ModelConfig.model_validate(manifest["config"])
        components = set(components)
        _check_components(components)
        model = cls(config, **kwargs)
        model.identity = {"name": config.name, "hash": manifest.get("hash")}
        model.trained = manifest.get("trained", True)
        if not model.trained:
            log.warning("model %s at %s is untrained: its images are noise", config.name, root)
        toks = {}
        if "text" in components:
            for enc, sub in TOKENIZER_DIRS.items():
                kind = getattr(config, enc).tokenizer
                toks[enc] = tok.load_tokenizer(kind, root / manifest.get("tokenizers", {}).get(enc, sub))
        model._build(components, toks)
        files = manifest.get("files", WEIGHT_FILES)
        for name, net in model.nets.items():
            entry = files.get(name)
            if entry is None:
                raise UserError(f"{root / 'model.json'}: 'files' has no entry for component {name!r}")
            checkpoints.load_weights(net, root / entry)
        return model

    @classmethod
    def from_released(cls, texture_ckpt: str | Path, structure_ckpt: str | Path, tokenizer_dirs: dict[str, str | Path],
                      *, config: ModelConfig | None = None, components: Iterable[str] = COMPONENTS,
                      device: runtime.Device = "cpu", **kwargs) -> "PanGuDraw":
        """Load the released PanGu-Draw v3 MindSpore checkpoints (SPEC section 6).

        The texture file gives the texture UNet, both text encoders and the VAE; of the structure file only the UNet
        is read. `tokenizer_dirs` maps text_encoder_1 / text_encoder_2 to directories with the released vocab files.
        """
        from diffusion import checkpoints, tokenizers as tok

        runtime.configure(device)
        config = config or PRESETS["pangu-draw-v3"]
        components = set(components)
        _check_components(components)
        model = cls(config, **kwargs)
        toks = {}
        if "text" in components:
            toks = {enc: tok.load_tokenizer(getattr(config, enc).tokenizer, Path(tokenizer_dirs[enc])) for enc in TOKENIZER_DIRS}
        model._build(components, toks)
        wanted = {"text": ("text_encoder_1", "text_encoder_2"), "texture": ("unet",), "vae": ("vae",)}
        texture_parts = [c for comp in components for c in wanted.get(comp, ())]
        if texture_parts:
            states = checkpoints.read_released(texture_ckpt, texture_parts)
            for part, state in states.items():
                target = "texture_unet" if part == "unet" else part
                checkpoints.load_state(model.nets[target], state, source=str(texture_ckpt))
        if "structure" in components:
            state = checkpoints.read_released(structure_ckpt, ["unet"])["unet"]
            checkpoints.load_state(model.nets["structure_unet"], state, source=str(structure_ckpt))
        model.identity = {"name": config.name, "hash": "released-" + hashlib.sha256(
            f"{Path(texture_ckpt).name}|{Path(structure_ckpt).name}".encode()).hexdigest()[:12]}
        return model

    def _build(self, components: set[str], tokenizers: dict[str, object]) -> None:
        from diffusion.nets.text_encoders import build_text_encoder
        from diffusion.nets.unet import UNet
        from diffusion.nets.vae import AutoencoderKL

        cfg = self.config
        if "text" in components:
            for enc in ("text_encoder_1", "text_encoder_2"):
                enc_cfg = getattr(cfg, enc)
                tok = tokenizers[enc]
                if tok.vocab_size > enc_cfg.vocab_size:
                    raise UserError(
                        f"{enc}: tokenizer has {tok.vocab_size} tokens but the encoder's table has {enc_cfg.vocab_size} rows"
                    )
                self.tokenizers[enc] = tok
                self.nets[enc] = build_text_encoder(enc_cfg, dtype=self.dtype)
        if "structure" in components:
            self.nets["structure_unet"] = UNet(cfg.structure_unet, dtype=self.dtype)
        if "texture" in components:
            if cfg.monolithic and "structure_unet" in self.nets:
                self.nets["texture_unet"] = self.nets["structure_unet"]
            else:
                self.nets["texture_unet"] = UNet(cfg.texture_unet, dtype=self.dtype)
        if "vae" in components:
            self.nets["vae"] = AutoencoderKL(cfg.vae, dtype=self.dtype)
        for net in self.nets.values():
            net.set_train(False)
        self._forward.clear()

    def save(self, path: str | Path, *, description: str = "", trained: bool | None = None,
             weights_dtype: str = "float32") -> Path:
        """Write our model directory format: model.json, one safetensors file per component, tokenizer files.

        `trained` is recorded so that loading an untrained (random) model warns that its images are noise; by default
        the flag of the model this one came from (a model made by `random()` is untrained). `weights_dtype`
        "float16" stores the weights in half the bytes (`convert_weights`); training writes float32.
        """
        if trained is None:
            trained = self.trained
        from diffusion import checkpoints

        missing = {"structure_unet", "texture_unet", "vae", "text_encoder_1", "text_encoder_2"} - set(self.nets)
        if missing:
            raise ValueError(f"cannot save a partial model; missing {sorted(missing)}")
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        files = dict(WEIGHT_FILES)
        if self.config.monolithic:
            files["structure_unet"] = files["texture_unet"] = "unet.safetensors"
        hashes = {}
        for name, fname in files.items():
            if fname not in hashes:
                checkpoints.save_weights(self.nets[name], root / fname, dtype=weights_dtype)
                hashes[fname] = checkpoints.weights_hash(root / fname)
        for enc, sub in TOKENIZER_DIRS.items():
            self.tokenizers[enc].save(root / sub)
        digest = model_hash(hashes)
        manifest = {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "description": description,
            "trained": trained,
            "config": json.loads(self.config.model_dump_json()),
            "weights_dtype": weights_dtype,
            "files": files,
            "file_hashes": hashes,
            "tokenizers": dict(TOKENIZER_DIRS),
            "hash": digest,
        }
        (root / "model.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        self.identity = {"name": self.config.name, "hash": digest}
        return root

    # ------------------------------------------------------------------ planning

    def plan(self, request: GenerationRequest) -> Plan:
        """Size, bucket, timesteps and split for a request; raises ValueError for parameters the model cannot use."""
        size = buckets.choose_size(self.config.bucket_scales, request.width, request.height, request.aspect)
        f = self.config.vae.downsample_factor
        if size.width % self.config.latent_factor or size.height % self.config.latent_factor:
            raise ValueError(
                f"{size.width}x{size.height} is not a multiple of {self.config.latent_factor} pixels, which this model needs"
            )
        samplers.get_sampler(request.sampler)
        timesteps = self.schedule.timesteps(request.steps)
        split = split_index(timesteps, self.config.switch_timestep, self.split_rule)
        latent_shape = (self.config.vae.embed_dim, size.height // f, size.width // f)
        return Plan(size, latent_shape, timesteps, split, guidance.active_branches(request.style_scales()))

    @staticmethod
    def shape_key(plan: Plan, request: GenerationRequest) -> tuple:
        """Rows with equal keys can share a sampling batch (and a compiled graph when branch counts match too)."""
        return (plan.size.width, plan.size.height, request.steps, request.sampler)

    # ------------------------------------------------------------------ stages

    def encode(self, requests: Sequence[GenerationRequest],
               control_images: Sequence[np.ndarray | None] | None = None) -> list[Conditioning]:
        """Both text encoders for every active branch of every row; identical texts are encoded once.

        `control_images` (a control model only: `config.control_channels` > 0): one uint8 (H, W, 3) image or None per
        row, turned into the row's layout map (`with_control`).
        """
        self._need("text_encoder_1", "text_encoder_2")
        plans = [self.plan(r) for r in requests]
        texts: dict[str, int] = {}
        per_row: list[list[int]] = []
        for req, plan in zip(requests, plans):
            idx = []
            for branch in plan.branches:
                text = guidance.branch_prompt(branch, req.prompt, req.negative_prompt)
                idx.append(texts.setdefault(text, len(texts)))
            per_row.append(idx)
        context, pooled = self._encode_texts(list(texts))
        out = []
        for plan, idx in zip(plans, per_row):
            bucket_vec = buckets.bucket_embedding(plan.size.bucket, self.config.bucket_embed_dim)
            y = np.concatenate([pooled[idx], np.broadcast_to(bucket_vec, (len(idx), bucket_vec.size))], axis=1)
            out.append(Conditioning(plan.branches, context[idx], y.astype(np.float32)))
        if control_images is not None:
            out = self.with_control(requests, out, control_images)
        return out

    def with_control(self, requests: Sequence[GenerationRequest], conds: Sequence[Conditioning],
                     control_images: Sequence[np.ndarray | None]) -> list[Conditioning]:
        """`conds` with each row's control image turned into its layout map at the row's latent size."""
        from diffusion import control

        if not self.config.control_channels:
            raise ValueError(f"model {self.config.name} takes no control image (control_channels is 0)")
        if len(control_images) != len(requests):
            raise ValueError(f"{len(control_images)} control images for {len(requests)} rows")
        out = []
        for req, cond, image in zip(requests, conds, control_images):
            _, h, w = self.plan(req).latent_shape
            cmap = None
            if image is not None:
                image = np.asarray(image)
                if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                    raise ValueError(f"a control image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
                cmap = np.repeat(control.layout_map(image, (h, w)), self.config.control_channels, axis=0)
            out.append(dataclasses.replace(cond, control=cmap))
        return out

    def _encode_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.batch_invariant:
            parts = [self._encode_text_batch([t]) for t in texts]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return self._encode_text_batch(texts)

    def _encode_text_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        # Pad the text batch to a power of two so a handful of compiled shapes serve every batch.
        n = len(texts)
        padded = texts + [""] * ((1 << max(n - 1, 0).bit_length()) - n)
        ids1 = self.tokenizers["text_encoder_1"](padded)
        ids2 = self.tokenizers["text_encoder_2"](padded)
        hidden1 = self._fwd("text_encoder_1")(ids1)
        hidden2, pooled = self._fwd("text_encoder_2")(ids2)
        context = np.concatenate([hidden1, hidden2], axis=-1)[:n]
        return context.astype(np.float32), pooled[:n].astype(np.float32)

    def initial_latents(self, requests: Sequence[GenerationRequest]) -> np.ndarray:
        plan = self.plan(requests[0])
        return noise.initial_noise([r.seed for r in requests], plan.latent_shape) * np.float32(
            np.sqrt(self.schedule.sigma_max**2 + 1.0)
        )

    def sample_structure(self, requests: Sequence[GenerationRequest], conds: Sequence[Conditioning], *,
                         fuse: Fuse | None = None) -> list[Handoff]:
        """Run the structure generator's steps from pure noise; returns each row's latent at the handoff."""
        plan = self._batch_plan(requests)
        x = self.initial_latents(requests)
        state: dict[str, np.ndarray] = {}
        x = self.run_steps(requests, conds, x, plan.structure_steps, state, fuse=fuse)
        return [Handoff(x[i], plan.split, {k: v[i] for k, v in state.items()}) for i in range(len(requests))]

    def sample_texture(self, requests: Sequence[GenerationRequest], conds: Sequence[Conditioning],
                       handoffs: Sequence[Handoff], *, fuse: Fuse | None = None) -> np.ndarray:
        """Continue from the handoff with the texture generator's steps; returns clean latents (B, C, h, w)."""
        plan = self._batch_plan(requests)
        if any(h.step != plan.split for h in handoffs):
            raise ValueError(f"handoffs are not at step {plan.split}, where this model's texture steps begin")
        x = np.stack([h.latent for h in handoffs])
        state = {k: np.stack([h.state[k] for h in handoffs]) for k in handoffs[0].state}
        return self.run_steps(requests, conds, x, plan.texture_steps, state, fuse=fuse)

    def sample(self, requests: Sequence[GenerationRequest], conds: Sequence[Conditioning], *,
               fuse: Fuse | None = None) -> np.ndarray:
        """Every step in one call (the UNet is picked per step); equal to sample_structure then sample_texture."""
        plan = self._batch_plan(requests)
        x = self.initial_latents(requests)
        return self.run_steps(requests, conds, x, range(len(plan.timesteps)), {}, fuse=fuse)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Clean latents -> uint8 images (B, H, W, 3): decode z / scale, then clip((x + 1) / 2) with rounding."""
        self._need("vae")
        z = latents.astype(np.float32) / np.float32(self.config.vae.scale_factor)
        x = self._per_row(self._fwd("vae_decode"), z)
        img = np.clip((x + 1.0) / 2.0, 0.0, 1.0) * 255.0
        return np.rint(img).astype(np.uint8).transpose(0, 2, 3, 1)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (B, H, W, 3) -> scaled latents (the posterior mean), the inverse of `decode`."""
        self._need("vae")
        x = images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
        mean = self._per_row(self._fwd("vae_encode"), x)
        return mean * np.float32(self.config.vae.scale_factor)

    def generate(self, requests: Sequence[GenerationRequest],
                 control_images: Sequence[np.ndarray | None] | None = None) -> list[np.ndarray]:
        """All stages in one process, rows grouped by shape; returns one uint8 (H, W, 3) image per request.

        `control_images`: a control model's per-row control images (see `encode`)."""
        out: list[np.ndarray | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(self.shape_key(self.plan(req), req), []).append(i)
        for idx in groups.values():
            batch = [requests[i] for i in idx]
            controls = None if control_images is None else [control_images[i] for i in idx]
            latents = self.sample(batch, self.encode(batch, controls))
            for i, img in zip(idx, self.decode(latents)):
                out[i] = img
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ internals

    def _batch_plan(self, requests: Sequence[GenerationRequest]) -> Plan:
        plans = [self.plan(r) for r in requests]
        keys = {self.shape_key(p, r) for p, r in zip(plans, requests)}
        if len(keys) != 1:
            raise ValueError(f"a sampling batch needs one size, step count and sampler; got {sorted(keys)}")
        return plans[0]

    def run_steps(self, requests: Sequence[GenerationRequest], conds: Sequence[Conditioning], x: np.ndarray,
                  steps: range, state: dict, *, fuse: Fuse | None = None) -> np.ndarray:
        """Run sampler steps `steps` on sigma-space latents `x` (the structure UNet below the split, texture above).

        `fuse(x, i, denoised) -> denoised`, when given, replaces the model's guided x0 prediction at each step
        before the sampler uses it (Coop-Diffusion joins other models there).
        """
        plan = self._batch_plan(requests)
        if len(steps) == 0:
            return x
        sigmas = self.schedule.sampling_sigmas(plan.timesteps)
        branch_counts = [len(c.branches) for c in conds]
        pair_row = np.repeat(np.arange(len(conds)), branch_counts)
        context = np.concatenate([c.context for c in conds])
        y = np.concatenate([c.y for c in conds])
        offsets = np.concatenate([[0], np.cumsum(branch_counts)])
        control_in = self._control_input(conds, plan)
        if control_in is not None:
            control_in = control_in[pair_row]

        def denoise(x_cur: np.ndarray, i: int) -> np.ndarray:
            which = "structure_unet" if i < plan.split else "texture_unet"
            sigma = np.float32(sigmas[i])
            x_in = x_cur[pair_row] / np.sqrt(sigma * sigma + np.float32(1.0))
            if control_in is not None:
                x_in = np.concatenate([x_in, control_in], axis=1)
            t = np.full(len(pair_row), plan.timesteps[i], dtype=np.int32)
            unet = self._fwd(which)
            if self.batch_invariant:
                out_pairs = np.concatenate([
                    unet(x_in[a:b], t[a:b], context[a:b], y[a:b]) for a, b in zip(offsets[:-1], offsets[1:])
                ])
            else:
                out_pairs = unet(x_in.astype(np.float32), t, context, y)
            guided = np.stack([
                guidance.combine(out_pairs[offsets[r]:offsets[r + 1]], conds[r].branches,
                                 requests[r].guidance_scale, requests[r].style_scales())
                for r in range(len(conds))
            ])
            denoised = x0_from_output(guided, x_cur, sigma, getattr(self.config, which).prediction)
            return fuse(x_cur, i, denoised) if fuse is not None else denoised

        sampler = samplers.get_sampler(requests[0].sampler)
        step_noise = noise.StepNoise([r.seed for r in requests], plan.latent_shape)
        return sampler(denoise, x, sigmas, steps, state, step_noise)

    def _control_input(self, conds: Sequence[Conditioning], plan: Plan) -> np.ndarray | None:
        """(B, control_channels, h, w) of a control model (zeros for rows without a map); None for other models."""
        from diffusion import control

        cc = self.config.control_channels
        if not cc:
            if any(c.control is not None for c in conds):
                raise ValueError(f"model {self.config.name} takes no control image (control_channels is 0)")
            return None
        hw = plan.latent_shape[1:]
        out = control.no_control(len(conds), cc, hw)
        for r, c in enumerate(conds):
            if c.control is not None:
                if c.control.shape != (cc, *hw):
                    raise ValueError(f"row {r}: control map of shape {c.control.shape}, expected {(cc, *hw)}")
                out[r] = c.control
        return out

    def _per_row(self, fn: Callable, x: np.ndarray) -> np.ndarray:
        if self.batch_invariant:
            return np.concatenate([fn(x[i:i + 1]) for i in range(len(x))])
        return fn(x)

    def _need(self, *names: str) -> None:
        missing = [n for n in names if n not in self.nets]
        if missing:
            raise RuntimeError(f"this model instance was loaded without {missing}")

    def _fwd(self, name: str) -> Callable:
        """The compiled forward of a component (built on first use, then reused for every batch)."""
        fn = self._forward.get(name)
        if fn is None:
            if name == "vae_decode":
                self._need("vae")
                target = self.nets["vae"].decode
            elif name == "vae_encode":
                self._need("vae")
                target = _MeanEncoder(self.nets["vae"]).construct
            else:
                self._need(name)
                target = self.nets[name].construct
            fn = self._forward[name] = runtime.CompiledForward(target, self.dtype, self.graph)
        return fn


class _MeanEncoder(ms.nn.Cell):
    """The VAE encoder's posterior mean as a Cell, so it compiles as one graph."""

    def __init__(self, vae: ms.nn.Cell):
        super().__init__()
        self.vae = vae

    def construct(self, x):
        mean, _ = self.vae.encode(x)
        return mean


def _check_components(components: set[str]) -> None:
    unknown = components - COMPONENTS
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; expected a subset of {sorted(COMPONENTS)}")


def default_model_dir() -> Path:
    """The shipped tiny model (inside the package, so it travels with an install).

    Where no trained model is shipped, a random tiny model is built once into the user's cache and used instead;
    loading it warns that its images are noise.
    """
    shipped = Path(__file__).resolve().parent / "shipped" / "pangu-draw-tiny"
    if (shipped / "model.json").is_file():
        return shipped
    import os

    from diffusion.config import tiny_config
    from diffusion.tiny import build_random_model

    cache = Path(os.environ.get("PANGUDRAW_CACHE", Path.home() / ".cache" / "pangudraw")) / "random-tiny-v1"
    if not (cache / "model.json").is_file():
        log.warning("no trained tiny model is shipped; building a random one at %s", cache)
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        build_random_model(tmp, config=tiny_config("pangu-draw-tiny-random"), seed=0)
        try:
            tmp.rename(cache)
        except OSError:  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return cache


def read_model_manifest(root: Path) -> dict:
    """Read and check `model.json`; every problem names the file and what was expected."""
    path = root / "model.json"
    if not root.is_dir():
        raise UserError(f"model directory {root} does not exist")
    if not path.is_file():
        raise UserError(f"{path} is missing: a model directory holds model.json, weights and tokenizer files")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format") != MODEL_FORMAT:
        raise UserError(f"{path}: 'format' is {manifest.get('format')!r}, expected {MODEL_FORMAT!r}")
    if manifest.get("format_version") != MODEL_FORMAT_VERSION:
        raise UserError(
            f"{path}: 'format_version' is {manifest.get('format_version')!r}, this version reads {MODEL_FORMAT_VERSION}"
        )
    if "config" not in manifest:
        raise UserError(f"{path}: no 'config' section")
    try:
        ModelConfig.model_validate(manifest["config"])
    except Exception as exc:  # pydantic's message names the field
        raise UserError(f"{path}: 'config' is invalid: {exc}") from None
    return manifest


def model_hash(file_hashes: dict[str, str]) -> str:
    """A model directory's identity: sha256 over its weight files' hashes (recorded in result manifests)."""
    return hashlib.sha256(json.dumps(sorted(file_hashes.items())).encode()).hexdigest()[:16]


def convert_weights(src: str | Path, weights_dtype: str = "float16", out: str | Path | None = None) -> dict:
    """Rewrite a model directory's weight files as `weights_dtype` ("float16": half the bytes; "float32").

    In place, or into `out` (a copy of the directory: tokenizers and every other file come along). Loading casts
    each tensor to its parameter's dtype, so a float16 model still computes in float32, with weights rounded to
    float16. Converting float16 back to float32 restores the dtype, not the dropped bits. The manifest's
    `weights_dtype`, file hashes and model hash are updated, the manifest last; a directory whose manifest already
    says `weights_dtype` is left as it is when converted in place. A weight that float16 cannot hold is refused
    before any file changes. Returns {"weights_dtype", "bytes_before", "bytes_after", "hash"}.
    """
    import shutil

    from diffusion import checkpoints

    src = Path(src)
    manifest = read_model_manifest(src)
    root = src if out is None or Path(out).resolve() == src.resolve() else Path(out)
    if root != src and root.exists():
        raise UserError(f"{root} exists; name a new directory (or convert in place without --out)")
    files = sorted(set(manifest.get("files", WEIGHT_FILES).values()))
    before = sum((src / f).stat().st_size for f in files)
    if root == src and manifest.get("weights_dtype", "float32") == weights_dtype:
        return {"weights_dtype": weights_dtype, "bytes_before": before, "bytes_after": before, "hash": manifest["hash"]}
    # Read and check every file first, so that a tensor float16 cannot hold leaves everything as it was.
    states = {f: checkpoints.cast_state(checkpoints.read_weights(src / f), weights_dtype, source=str(src / f))
              for f in files}
    if root != src:
        shutil.copytree(src, root)
    for fname, state in states.items():
        checkpoints.write_weights(state, root / fname)
    hashes = {f: checkpoints.weights_hash(root / f) for f in files}
    manifest.update(weights_dtype=weights_dtype, file_hashes=hashes, hash=model_hash(hashes))
    tmp = root / "model.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(root / "model.json")
    after = sum((root / f).stat().st_size for f in files)
    return {"weights_dtype": weights_dtype, "bytes_before": before, "bytes_after": after, "hash": manifest["hash"]}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}") from None
