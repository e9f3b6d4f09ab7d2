"""Configuration of every PanGu-Draw network, as pydantic models, plus the named presets.

Every size is a config value: the full-size released architecture (`pangu-draw-v3`), the `bench-small` UNet
used by speed comparisons, and the tiny CPU configs used by tests and the shipped model are all instances
of the same classes.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# UNetConfig fields that set a UNet's layout (`pangudraw train unet --unet`, `TinyModelRecipe.structure_unet`): not
# the widths tied to the VAE and the text encoders, nor what the network predicts.
UNET_LAYOUT_FIELDS = ("model_channels", "channel_mult", "num_res_blocks", "transformer_depth",
                      "transformer_depth_middle", "num_head_channels", "norm_groups", "patch_size")


class UNetConfig(_Frozen):
    """SDXL/PanGu-layout UNet (sgm `openaimodel.UNetModel`, non-legacy, linear transformer projections)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    # Transformer depth per level; 0 means no attention at that level (SDXL: none at level 1).
    transformer_depth: tuple[int, ...] = (0, 2, 10)
    transformer_depth_middle: int = 10
    num_head_channels: int = 64
    context_dim: int = 2048
    # Width of the label-embedding input y = pooled text + bucket sinusoid (SDXL: 2816, PanGu-Draw: 1536).
    adm_in_channels: int = 1536
    use_linear_in_transformer: bool = True
    norm_groups: int = 32
    # What the network outputs: the noise ("epsilon", SDXL and the released PanGu-Draw) or the velocity
    # v = sqrt(a) eps - sqrt(1 - a) x0 ("v"), which at high noise is close to -x0 (`diffusion.schedule.x0_from_output`).
    prediction: Literal["epsilon", "v"] = "epsilon"
    # Two more input channels, made inside the network, holding each latent pixel's x and y position in (-1, 1)
    # (False: the SDXL layout). Convolutions and attention see absolute position only through the zero padding;
    # docs/training.md measures what reading it does for the tiny structure generator.
    position_channels: bool = False
    # ResBlocks take a scale and a shift of their second norm's output from the time/label embedding (FiLM, as in
    # the improved-DDPM and ADM UNets) instead of adding it (False: the SDXL layout). Doubles each `emb_layers`.
    scale_shift_norm: bool = False
    # Latent pixels per side folded into one position before the first convolution (space-to-depth) and unfolded
    # after the last (depth-to-space), so every level works at 1/patch_size of the latent's side (1: the SDXL
    # layout). For a generator of high-noise steps only, whose output has no detail finer than a few latent
    # pixels; docs/training.md measures it on the tiny structure generator.
    patch_size: int = Field(1, ge=1, le=4)

    @model_validator(mode="after")
    def _check(self) -> "UNetConfig":
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError("transformer_depth needs one entry per channel_mult level")
        for m in self.channel_mult:
            if (self.model_channels * m) % self.norm_groups:
                raise ValueError(f"channels {self.model_channels * m} not divisible by norm_groups {self.norm_groups}")
            if any(self.transformer_depth) and (self.model_channels * m) % self.num_head_channels:
                raise ValueError(f"channels {self.model_channels * m} not divisible by head width {self.num_head_channels}")
        return self

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def downsample_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)


class VAEConfig(_Frozen):
    """KL autoencoder of the SDXL/LDM layout (`first_stage_model`)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    scale_factor: float = 0.13025
    # 0: no normalisation layers (the shipped tiny VAE: half the step time on CPU, and `patch_mean_init` needs it).
    norm_groups: int = Field(32, ge=0)
    mid_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class TextEncoderConfig(_Frozen):
    """A CLIP-style causal text transformer.

    `layout="hf_clip"` is text encoder 1 (CLIP ViT-L/14 text model, HF naming, fed by a Chinese WordPiece
    tokenizer, output = last layer after the final norm). `layout="open_clip"` is text encoder 2 (OpenCLIP
    ViT-bigG/14 naming, CLIP BPE tokenizer, output = penultimate layer, plus a pooled projection).
    """

    layout: Literal["hf_clip", "open_clip"]
    tokenizer: Literal["wordpiece", "clip_bpe"]
    vocab_size: int
    width: int
    layers: int
    heads: int
    context_length: int = 77
    output_layer: Literal["last", "penultimate"]
    # Width of the pooled projection; 0 means no pooled output.
    projection_dim: int = 0
    act: Literal["quick_gelu", "gelu"] = "quick_gelu"


class ModelConfig(_Frozen):
    """A whole PanGu-Draw model: two UNets (structure, texture), VAE, two text encoders, sizes and timesteps."""

    name: str
    structure_unet: UNetConfig
    texture_unet: UNetConfig
    vae: VAEConfig
    text_encoder_1: TextEncoderConfig
    text_encoder_2: TextEncoderConfig
    bucket_embed_dim: int = 256
    # T_s: the structure generator denoises t >= T_s, the texture generator t < T_s.
    switch_timestep: int = 500
    # Multipliers of the 11 base buckets (near 512x512 area) that this model generates at.
    bucket_scales: tuple[float, ...] = (1.0, 2.0)
    # True when one UNet serves every timestep (a monolithic model; both configs then hold the same net).
    monolithic: bool = False
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # Extra UNet input channels that carry a control image (diffusion.control: a layout map at latent resolution,
    # concatenated to the latents at every step); 0 for a text-only model.
    control_channels: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        pooled = self.text_encoder_2.projection_dim
        for which, unet in (("structure_unet", self.structure_unet), ("texture_unet", self.texture_unet)):
            if unet.adm_in_channels != pooled + self.bucket_embed_dim:
                raise ValueError(
                    f"{which}.adm_in_channels is {unet.adm_in_channels}, expected pooled text "
                    f"{pooled} + bucket embedding {self.bucket_embed_dim}"
                )
            ctx = self.text_encoder_1.width + self.text_encoder_2.width
            if unet.context_dim != ctx:
                raise ValueError(f"{which}.context_dim is {unet.context_dim}, expected encoder widths sum {ctx}")
            if unet.in_channels != self.vae.embed_dim + self.control_channels:
                raise ValueError(f"{which}.in_channels {unet.in_channels} != vae.embed_dim {self.vae.embed_dim}"
                                 + (f" + control_channels {self.control_channels}" if self.control_channels else ""))
            if unet.out_channels != self.vae.embed_dim:
                raise ValueError(f"{which}.out_channels {unet.out_channels} != vae.embed_dim {self.vae.embed_dim}")
        if self.monolithic and self.structure_unet != self.texture_unet:
            raise ValueError("a monolithic model uses one UNet config for both stages")
        return self

    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell times the UNets' patch size: image sides must be multiples of it. The UNets' own
        stride-2 levels take any side (an odd side is rounded up, and the way up lands on it again: `Upsample.to_size`)."""
        return self.vae.downsample_factor * max(self.structure_unet.patch_size, self.texture_unet.patch_size)


# ---------------------------------------------------------------- presets

PANGU_DRAW_V3 = ModelConfig(
    name="pangu-draw-v3",
    structure_unet=UNetConfig(),
    texture_unet=UNetConfig(),
    vae=VAEConfig(),
    text_encoder_1=TextEncoderConfig(
        layout="hf_clip", tokenizer="wordpiece", vocab_size=21128, width=768, layers=12, heads=12,
        output_layer="last", projection_dim=0, act="quick_gelu",
    ),
    text_encoder_2=TextEncoderConfig(
        layout="open_clip", tokenizer="clip_bpe", vocab_size=49408, width=1280, layers=32, heads=20,
        output_layer="penultimate", projection_dim=1280, act="gelu",
    ),
)

# The UNet of ../shared/bench-small.md: every speed comparison of ours uses it.
BENCH_SMALL_UNET = UNetConfig(
    model_channels=64,
    channel_mult=(1, 2, 4),
    num_res_blocks=2,
    transformer_depth=(0, 1, 2),
    transformer_depth_middle=2,
    num_head_channels=32,
    context_dim=256,
    adm_in_channels=160,
)


def tiny_config(name: str = "tiny", *, model_channels: int = 32, vocab_1: int = 256, vocab_2: int = 256,
                monolithic: bool = False) -> ModelConfig:
    """A tiny CPU model: f=4 VAE, 2-level UNet, 64x64 square bucket (bucket scale 1/8)."""
    unet = UNetConfig(
        model_channels=model_channels,
        channel_mult=(1, 2),
        num_res_blocks=1,
        transformer_depth=(0, 1),
        transformer_depth_middle=1,
        num_head_channels=16,
        context_dim=64,
        adm_in_channels=32 + 16,
        norm_groups=8,
    )
    return ModelConfig(
        name=name,
        structure_unet=unet,
        texture_unet=unet,
        vae=VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, scale_factor=1.0),
        text_encoder_1=TextEncoderConfig(
            layout="hf_clip", tokenizer="wordpiece", vocab_size=vocab_1, width=32, layers=2, heads=2,
            output_layer="last",
        ),
        text_encoder_2=TextEncoderConfig(
            layout="open_clip", tokenizer="clip_bpe", vocab_size=vocab_2, width=32, layers=2, heads=2,
            output_layer="penultimate", projection_dim=32, act="gelu",
        ),
        bucket_embed_dim=16,
        bucket_scales=(0.125,),
        monolithic=monolithic,
    )


PRESETS: dict[str, ModelConfig] = {"pangu-draw-v3": PANGU_DRAW_V3, "tiny": tiny_config()}


# ---------------------------------------------------------------- tiny Coop-Diffusion partners (SPEC section 8)

def tiny_sd15_config(name: str = "tiny-sd15", *, model_channels: int = 32) -> ModelConfig:
    """A tiny model with another latent space, in the SD-1.5 style: one UNet for every timestep and an f=8 VAE with
    SD-1.5's latent scale 0.18215. At the 64x64 square bucket its latents are 8x8 where `tiny_config()` has 16x16."""
    base = tiny_config(name, model_channels=model_channels, monolithic=True)
    vae = VAEConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8, scale_factor=0.18215)
    return ModelConfig.model_validate({**base.model_dump(), "vae": vae.model_dump()})


def tiny_lowres_config(name: str = "tiny-lowres", *, model_channels: int = 32) -> ModelConfig:
    """`tiny_config()` at half the side: a 32x32 square bucket (bucket scale 1/16), the low-resolution partner."""
    base = tiny_config(name, model_channels=model_channels)
    return ModelConfig.model_validate({**base.model_dump(), "bucket_scales": (0.0625,)})


def with_control_channels(config: ModelConfig, channels: int = 1) -> ModelConfig:
    """`config` as a control model: `channels` layout-map inputs (diffusion.control) beside the latent channels."""
    unets = {which: {**getattr(config, which).model_dump(), "in_channels": config.vae.embed_dim + channels}
             for which in ("structure_unet", "texture_unet")}
    return ModelConfig.model_validate({**config.model_dump(), **unets, "control_channels": channels})


def tiny_control_config(name: str = "tiny-control", *, model_channels: int = 32) -> ModelConfig:
    """`tiny_sd15_config()` trained to take an image: one control channel (a layout map, diffusion.control) beside
    its 4 latent channels."""
    return with_control_channels(tiny_sd15_config(name, model_channels=model_channels))


PRESETS["tiny-sd15"] = tiny_sd15_config()
PRESETS["tiny-control"] = tiny_control_config()
PRESETS["tiny-lowres"] = tiny_lowres_config()
