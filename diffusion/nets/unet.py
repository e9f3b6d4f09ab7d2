"""The SDXL/PanGu-Draw UNet (sgm `openaimodel.UNetModel` layout: non-legacy, linear transformer projections).

Parameter names equal the released ones without the `model.diffusion_model.` prefix, so released and
converted weights load by name. Every block of `input_blocks`, `middle_block` and `output_blocks` is a
`CellList` of layers that all take `(h, emb, context)`, which keeps the construct a plain loop that
graph mode unrolls.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from diffusion.config import UNetConfig
from diffusion.nets.layers import Attention, Conv2d, GroupNorm32, LayerNorm32, gelu_exact, timestep_embedding

# sgm uses eps 1e-5 for the ResBlock/output norms and 1e-6 for the transformer's input norm.
RESBLOCK_NORM_EPS = 1e-5
TRANSFORMER_NORM_EPS = 1e-6


def _conv3x3(cin: int, cout: int, stride: int = 1, dtype=ms.float32) -> Conv2d:
    return Conv2d(cin, cout, 3, stride=stride, padding=1, dtype=dtype)


class InputConv(Conv2d):
    """The first 3x3 convolution (`input_blocks.0.0`), with the block calling convention."""

    def __init__(self, cin: int, cout: int, dtype=ms.float32):
        super().__init__(cin, cout, 3, padding=1, dtype=dtype)

    def construct(self, x, emb=None, context=None):
        return self.convolve(x)


class ResBlock(nn.Cell):
    """GroupNorm-SiLU-conv, add the projected time embedding, GroupNorm-SiLU-conv, plus a skip path."""

    upsamples = False

    def __init__(self, channels: int, out_channels: int, emb_channels: int, groups: int, dtype=ms.float32,
                 scale_shift: bool = False):
        super().__init__()
        self.scale_shift = scale_shift
        self.out_channels = out_channels
        self.in_layers = nn.SequentialCell([
            GroupNorm32(groups, channels, RESBLOCK_NORM_EPS, dtype), nn.SiLU(), _conv3x3(channels, out_channels, dtype=dtype),
        ])
        # With `scale_shift` the embedding gives a scale and a shift of the second norm's output (FiLM).
        self.emb_layers = nn.SequentialCell([
            nn.SiLU(), nn.Dense(emb_channels, out_channels * (2 if scale_shift else 1), dtype=dtype)])
        # Index 2 is the (inference-time no-op) dropout of the released layout.
        self.out_layers = nn.SequentialCell([
            GroupNorm32(groups, out_channels, RESBLOCK_NORM_EPS, dtype), nn.SiLU(), nn.Identity(),
            _conv3x3(out_channels, out_channels, dtype=dtype),
        ])
        self.has_skip_conv = channels != out_channels
        if self.has_skip_conv:
            self.skip_connection = Conv2d(channels, out_channels, 1, dtype=dtype)
        else:
            self.skip_connection = nn.Identity()

    def construct(self, x, emb, context=None):
        h = self.in_layers(x)
        e = ops.expand_dims(ops.expand_dims(self.emb_layers(emb), -1), -1)
        if self.scale_shift:
            c = self.out_channels
            h = self.out_layers[0](h) * (1.0 + e[:, :c]) + e[:, c:]
            h = self.out_layers[3](self.out_layers[1](h))
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class FeedForward(nn.Cell):
    """GEGLU feed-forward: `net.0.proj` to 2 x inner, value * gelu(gate), `net.2` back to dim."""

    def __init__(self, dim: int, mult: int = 4, dtype=ms.float32):
        super().__init__()
        inner = dim * mult
        self.net = nn.SequentialCell([GEGLU(dim, inner, dtype), nn.Identity(), nn.Dense(inner, dim, dtype=dtype)])

    def construct(self, x):
        return self.net(x)


class GEGLU(nn.Cell):
    def __init__(self, dim_in: int, dim_out: int, dtype=ms.float32):
        super().__init__()
        self.proj = nn.Dense(dim_in, dim_out * 2, dtype=dtype)

    def construct(self, x):
        value, gate = ops.chunk(self.proj(x), 2, axis=-1)
        return value * gelu_exact(gate)


class BasicTransformerBlock(nn.Cell):
    """Pre-norm self-attention, cross-attention on the text context, and GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dtype=ms.float32):
        super().__init__()
        self.attn1 = Attention(dim, heads, dim_head, None, dtype)
        self.ff = FeedForward(dim, dtype=dtype)
        self.attn2 = Attention(dim, heads, dim_head, context_dim, dtype)
        self.norm1 = LayerNorm32(dim, dtype=dtype)
        self.norm2 = LayerNorm32(dim, dtype=dtype)
        self.norm3 = LayerNorm32(dim, dtype=dtype)

    def construct(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Cell):
    """GroupNorm, linear `proj_in` over tokens (h*w), `depth` transformer blocks, linear `proj_out`, residual."""

    upsamples = False

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, groups: int,
                 dtype=ms.float32):
        super().__init__()
        inner = heads * dim_head
        self.norm = GroupNorm32(groups, channels, TRANSFORMER_NORM_EPS, dtype)
        self.proj_in = nn.Dense(channels, inner, dtype=dtype)
        self.transformer_blocks = nn.CellList([
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dtype) for _ in range(depth)
        ])
        self.proj_out = nn.Dense(inner, channels, dtype=dtype)

    def construct(self, x, emb, context):
        b, c, h, w = x.shape
        tokens = ops.transpose(ops.reshape(self.norm(x), (b, c, h * w)), (0, 2, 1))
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        tokens = self.proj_out(tokens)
        return ops.reshape(ops.transpose(tokens, (0, 2, 1)), (b, c, h, w)) + x


class Downsample(nn.Cell):
    """A 3x3 convolution with stride 2 (`op`)."""

    upsamples = False

    def __init__(self, channels: int, dtype=ms.float32):
        super().__init__()
        self.op = _conv3x3(channels, channels, stride=2, dtype=dtype)

    def construct(self, x, emb=None, context=None):
        return self.op(x)


class Upsample(nn.Cell):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution (`conv`). `to_size` upsamples to a side of
    2n - 1 where the stride-2 level below rounded an odd side up (nearest upsampling to the size, as diffusers'
    `upsample_size` does: the x2 grid with its last row or column dropped)."""

    upsamples = True

    def __init__(self, channels: int, dtype=ms.float32):
        super().__init__()
        self.conv = _conv3x3(channels, channels, dtype=dtype)

    def construct(self, x, emb=None, context=None):
        b, c, h, w = x.shape
        return self.to_size(x, h * 2, w * 2)

    def to_size(self, x, height: int, width: int):
        b, c, h, w = x.shape
        # Broadcast + reshape is nearest x2 without a resize kernel (which some backends lack for bf16).
        x = ops.reshape(ops.broadcast_to(ops.reshape(x, (b, c, h, 1, w, 1)), (b, c, h, 2, w, 2)), (b, c, h * 2, w * 2))
        if height != h * 2 or width != w * 2:
            x = x[:, :, :height, :width]
        return self.conv(x)


def position_grid(x):
    """(B, C, H, W) -> (B, 2, H, W): each pixel's x (channel 0) and y (channel 1) position, pixel centres in (-1, 1)
    from left to right and top to bottom, the same for every aspect ratio."""
    b, height, width = x.shape[0], x.shape[2], x.shape[3]
    xs = (ops.arange(width).astype(x.dtype) * 2.0 + 1.0) / width - 1.0
    ys = (ops.arange(height).astype(x.dtype) * 2.0 + 1.0) / height - 1.0
    grid = ops.stack((ops.broadcast_to(xs.reshape(1, width), (height, width)),
                      ops.broadcast_to(ys.reshape(height, 1), (height, width))))
    return ops.broadcast_to(grid.expand_dims(0), (b, 2, height, width))


def space_to_depth(x, p: int):
    """(B, C, H, W) -> (B, C*p*p, H/p, W/p): each p x p block of pixels becomes one position; channel c*p*p + i*p + j
    holds the block's pixel (i, j) of channel c."""
    b, c, height, width = x.shape
    x = x.reshape(b, c, height // p, p, width // p, p)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, height // p, width // p)


def depth_to_space(x, p: int):
    """The inverse of `space_to_depth`."""
    b, cpp, h, w = x.shape
    c = cpp // (p * p)
    x = x.reshape(b, c, p, p, h, w)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, c, h * p, w * p)


class UNet(nn.Cell):
    """eps = UNet(x, timesteps, context, y) for latents x (B, C, h, w), DDPM timesteps (B,), text context, label y."""

    def __init__(self, cfg: UNetConfig, dtype=ms.float32):
        super().__init__()
        self.cfg = cfg
        self.compute_dtype = dtype
        self.model_channels = cfg.model_channels
        mc = cfg.model_channels
        ted = cfg.time_embed_dim
        groups = cfg.norm_groups
        ss = cfg.scale_shift_norm

        self.time_embed = nn.SequentialCell([nn.Dense(mc, ted, dtype=dtype), nn.SiLU(), nn.Dense(ted, ted, dtype=dtype)])
        self.label_emb = nn.SequentialCell([nn.SequentialCell([
            nn.Dense(cfg.adm_in_channels, ted, dtype=dtype), nn.SiLU(), nn.Dense(ted, ted, dtype=dtype),
        ])])

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads = ch // cfg.num_head_channels
            return SpatialTransformer(ch, heads, cfg.num_head_channels, depth, cfg.context_dim, groups, dtype)

        self.position_channels = cfg.position_channels
        self.patch_size = cfg.patch_size
        folded_in = (cfg.in_channels + (2 if cfg.position_channels else 0)) * cfg.patch_size ** 2
        input_blocks = [nn.CellList([InputConv(folded_in, mc, dtype)])]
        skip_channels = [mc]
        ch = mc
        last_level = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, mc * mult, ted, groups, dtype, ss)]
                ch = mc * mult
                if cfg.transformer_depth[level] > 0:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                input_blocks.append(nn.CellList(layers))
                skip_channels.append(ch)
            if level != last_level:
                input_blocks.append(nn.CellList([Downsample(ch, dtype)]))
                skip_channels.append(ch)
        self.input_blocks = nn.CellList(input_blocks)

        middle = [ResBlock(ch, ch, ted, groups, dtype, ss)]
        if cfg.transformer_depth_middle > 0:
            middle.append(transformer(ch, cfg.transformer_depth_middle))
        middle.append(ResBlock(ch, ch, ted, groups, dtype, ss))
        self.middle_block = nn.CellList(middle)

        output_blocks = []
        for level in range(last_level, -1, -1):
            mult = cfg.channel_mult[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), mc * mult, ted, groups, dtype, ss)]
                ch = mc * mult
                if cfg.transformer_depth[level] > 0:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch, dtype))
                output_blocks.append(nn.CellList(layers))
        self.output_blocks = nn.CellList(output_blocks)

        self.out = nn.SequentialCell([
            GroupNorm32(groups, ch, RESBLOCK_NORM_EPS, dtype), nn.SiLU(),
            _conv3x3(ch, cfg.out_channels * cfg.patch_size ** 2, dtype=dtype),
        ])

    def construct(self, x, timesteps, context, y):
        t_emb = timestep_embedding(timesteps, self.model_channels).astype(self.compute_dtype)
        emb = self.time_embed(t_emb) + self.label_emb(y.astype(self.compute_dtype))
        context = context.astype(self.compute_dtype)
        h = x.astype(self.compute_dtype)
        if self.position_channels:
            h = ops.concat((h, position_grid(h)), axis=1)
        if self.patch_size > 1:
            h = space_to_depth(h, self.patch_size)
        skips = []
        for block in self.input_blocks:
            for layer in block:
                h = layer(h, emb, context)
            skips.append(h)
        for layer in self.middle_block:
            h = layer(h, emb, context)
        # Index from the end instead of list.pop(): graph mode unrolls the loops and needs plain indexing.
        skip_index = len(skips) - 1
        for block in self.output_blocks:
            h = ops.concat((h, skips[skip_index]), axis=1)
            skip_index = skip_index - 1
            for layer in block:
                if layer.upsamples:
                    # To the next skip's side: a stride-2 level rounds an odd side up, x2 would overshoot it.
                    h = layer.to_size(h, skips[skip_index].shape[2], skips[skip_index].shape[3])
                else:
                    h = layer(h, emb, context)
        out = self.out(h)
        if self.patch_size > 1:
            out = depth_to_space(out, self.patch_size)
        return out.astype(x.dtype)


def count_parameters(cell: nn.Cell) -> int:
    """Number of scalar parameters of a cell (works on lazily initialised parameters too)."""
    total = 0
    for p in cell.get_parameters():
        n = 1
        for s in p.shape:
            n *= s
        total += n
    return total
