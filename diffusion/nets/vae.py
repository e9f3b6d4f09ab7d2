"""The KL autoencoder of SDXL / PanGu-Draw (`first_stage_model`), in the LDM layout.

Parameter names equal the released checkpoint's names without the `first_stage_model.` prefix
(`encoder.down.0.block.0.norm1.gamma`, `decoder.up.3.upsample.conv.weight`, `quant_conv.weight`, ...).
Group norms and the attention softmax run in float32 whatever the network's dtype: the SDXL VAE overflows
in float16 otherwise.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from diffusion.config import VAEConfig
from diffusion.nets.layers import Conv2d, GroupNorm32

# LDM's `Normalize`: GroupNorm with eps 1e-6.
_NORM_EPS = 1e-6
# LDM's DiagonalGaussianDistribution clamps the log-variance to this range.
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0


class _NoNorm(nn.Cell):
    """Stands in for a group norm when `VAEConfig.norm_groups` is 0 (no parameters, returns its input)."""

    def construct(self, x):
        return x


def _norm(channels: int, groups: int, dtype: ms.Type) -> nn.Cell:
    if groups == 0:
        return _NoNorm()
    return GroupNorm32(groups, channels, eps=_NORM_EPS, dtype=dtype)


def _conv(cin: int, cout: int, kernel: int, dtype: ms.Type, stride: int = 1, pad: int | None = None) -> Conv2d:
    pad = kernel // 2 if pad is None else pad
    return Conv2d(cin, cout, kernel, stride=stride, padding=pad, dtype=dtype)


class _ResnetBlock(nn.Cell):
    """norm -> swish -> conv, twice, plus a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int, dtype: ms.Type):
        super().__init__()
        self.norm1 = _norm(cin, groups, dtype)
        self.conv1 = _conv(cin, cout, 3, dtype)
        self.norm2 = _norm(cout, groups, dtype)
        self.conv2 = _conv(cout, cout, 3, dtype)
        self.has_shortcut = cin != cout
        if self.has_shortcut:
            self.nin_shortcut = _conv(cin, cout, 1, dtype)

    def construct(self, x):
        h = self.conv1(ops.silu(self.norm1(x)))
        h = self.conv2(ops.silu(self.norm2(h)))
        if self.has_shortcut:
            x = self.nin_shortcut(x)
        return x + h


class _SpatialSelfAttention(nn.Cell):
    """Single-head self-attention over all pixels with 1x1-conv projections (`q`, `k`, `v`, `proj_out`)."""

    def __init__(self, channels: int, groups: int, dtype: ms.Type):
        super().__init__()
        self.norm = _norm(channels, groups, dtype)
        self.q = _conv(channels, channels, 1, dtype)
        self.k = _conv(channels, channels, 1, dtype)
        self.v = _conv(channels, channels, 1, dtype)
        self.proj_out = _conv(channels, channels, 1, dtype)
        self.scale = float(channels) ** -0.5

    def construct(self, x):
        b, c, h, w = x.shape
        hn = self.norm(x)
        q = self.q(hn).reshape(b, c, h * w).transpose(0, 2, 1)  # (B, HW, C)
        k = self.k(hn).reshape(b, c, h * w)  # (B, C, HW)
        v = self.v(hn).reshape(b, c, h * w)  # (B, C, HW)
        scores = ops.bmm(q * self.scale, k).astype(ms.float32)  # (B, HW query, HW key)
        weights = ops.softmax(scores, axis=-1).astype(v.dtype)
        out = ops.bmm(v, weights.transpose(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class _Downsample(nn.Cell):
    """Stride-2 3x3 conv after padding right and bottom by one (LDM's asymmetric padding)."""

    def __init__(self, channels: int, dtype: ms.Type):
        super().__init__()
        self.conv = _conv(channels, channels, 3, dtype, stride=2, pad=0)

    def construct(self, x):
        return self.conv(ops.pad(x, (0, 1, 0, 1)))


class _Upsample(nn.Cell):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int, dtype: ms.Type):
        super().__init__()
        self.conv = _conv(channels, channels, 3, dtype)

    def construct(self, x):
        b, c, h, w = x.shape
        x = ops.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, 2, w, 2)).reshape(b, c, h * 2, w * 2)
        return self.conv(x)


class _DownLevel(nn.Cell):
    """One encoder resolution: `block.N` res blocks, then `downsample` except at the last level."""

    def __init__(self, blocks: list[_ResnetBlock], downsample: _Downsample | None):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.has_downsample = downsample is not None
        if downsample is not None:
            self.downsample = downsample

    def construct(self, x):
        for blk in self.block:
            x = blk(x)
        if self.has_downsample:
            x = self.downsample(x)
        return x


class _UpLevel(nn.Cell):
    """One decoder resolution: `block.N` res blocks, then `upsample` except at level 0."""

    def __init__(self, blocks: list[_ResnetBlock], upsample: _Upsample | None):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.has_upsample = upsample is not None
        if upsample is not None:
            self.upsample = upsample

    def construct(self, x):
        for blk in self.block:
            x = blk(x)
        if self.has_upsample:
            x = self.upsample(x)
        return x


class _Mid(nn.Cell):
    """`block_1` -> `attn_1` (when enabled) -> `block_2` at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool, dtype: ms.Type):
        super().__init__()
        self.block_1 = _ResnetBlock(channels, channels, groups, dtype)
        self.has_attention = attention
        if attention:
            self.attn_1 = _SpatialSelfAttention(channels, groups, dtype)
        self.block_2 = _ResnetBlock(channels, channels, groups, dtype)

    def construct(self, x):
        x = self.block_1(x)
        if self.has_attention:
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nn.Cell):
    """Image (B, in, H, W) -> moments (B, 2 * z_channels, H / f, W / f)."""

    def __init__(self, cfg: VAEConfig, dtype: ms.Type = ms.float32):
        super().__init__()
        g = cfg.norm_groups
        self.conv_in = _conv(cfg.in_channels, cfg.ch, 3, dtype)
        levels = []
        cin = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            cout = cfg.ch * mult
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(_ResnetBlock(cin, cout, g, dtype))
                cin = cout
            last = i == len(cfg.ch_mult) - 1
            levels.append(_DownLevel(blocks, None if last else _Downsample(cout, dtype)))
        self.down = nn.CellList(levels)
        self.mid = _Mid(cin, g, cfg.mid_attention, dtype)
        self.norm_out = _norm(cin, g, dtype)
        self.conv_out = _conv(cin, 2 * cfg.z_channels, 3, dtype)

    def construct(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(ops.silu(self.norm_out(h)))


class Decoder(nn.Cell):
    """Latent (B, z_channels, h, w) -> image (B, out, h * f, w * f). `up.N` is stored in encoder order, run reversed."""

    def __init__(self, cfg: VAEConfig, dtype: ms.Type = ms.float32):
        super().__init__()
        g = cfg.norm_groups
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = _conv(cfg.z_channels, cin, 3, dtype)
        self.mid = _Mid(cin, g, cfg.mid_attention, dtype)
        levels: list[_UpLevel | None] = [None] * len(cfg.ch_mult)
        for i in reversed(range(len(cfg.ch_mult))):
            cout = cfg.ch * cfg.ch_mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(_ResnetBlock(cin, cout, g, dtype))
                cin = cout
            levels[i] = _UpLevel(blocks, _Upsample(cout, dtype) if i != 0 else None)
        self.up = nn.CellList(levels)
        self.norm_out = _norm(cin, g, dtype)
        self.conv_out = _conv(cin, cfg.out_channels, 3, dtype)
        self.num_levels = len(cfg.ch_mult)

    def construct(self, z):
        h = self.mid(self.conv_in(z))
        for i in range(self.num_levels - 1, -1, -1):
            h = self.up[i](h)
        return self.conv_out(ops.silu(self.norm_out(h)))


class AutoencoderKL(nn.Cell):
    """The SDXL VAE: `encode` images in [-1, 1] to the posterior (mean, logvar); `decode` latents to images.

    Latents here are unscaled: multiply by `cfg.scale_factor` before diffusion and divide after. Inputs are cast to
    the network's dtype; outputs are float32. Calling the Cell decodes.
    """

    def __init__(self, cfg: VAEConfig, dtype: ms.Type = ms.float32):
        super().__init__()
        self.cfg = cfg
        self.compute_dtype = dtype
        self.encoder = Encoder(cfg, dtype)
        self.decoder = Decoder(cfg, dtype)
        self.quant_conv = _conv(2 * cfg.z_channels, 2 * cfg.embed_dim, 1, dtype)
        self.post_quant_conv = _conv(cfg.embed_dim, cfg.z_channels, 1, dtype)
        self.embed_dim = cfg.embed_dim

    @property
    def scale_factor(self) -> float:
        return self.cfg.scale_factor

    @property
    def downsample_factor(self) -> int:
        return self.cfg.downsample_factor

    def encode(self, x):
        """(B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, embed_dim, H / f, W / f), float32."""
        moments = self.quant_conv(self.encoder(x.astype(self.compute_dtype))).astype(ms.float32)
        mean = moments[:, : self.embed_dim]
        logvar = ops.clamp(moments[:, self.embed_dim:], _LOGVAR_MIN, _LOGVAR_MAX)
        return mean, logvar

    def decode(self, z):
        """(B, embed_dim, h, w) unscaled latents -> (B, 3, h * f, w * f) images, about [-1, 1], float32."""
        x = self.decoder(self.post_quant_conv(z.astype(self.compute_dtype)))
        return x.astype(ms.float32)

    def construct(self, z):
        return self.decode(z)
