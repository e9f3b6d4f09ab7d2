"""Building blocks shared by the PanGu-Draw networks: sinusoid embeddings, fp32 norms, softmax attention.

Every block takes a `dtype` for its parameters. Norms and the attention softmax always compute in float32
and hand back the input's dtype, so a float16/bfloat16 network keeps the statistics of the float32 one.
Only `mindspore.nn` / `mindspore.ops` are used, so the blocks run on CPU and Ascend alike.
"""
from __future__ import annotations

import math
import os

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer


def timestep_embedding_np(values: np.ndarray, dim: int, max_period: float = 10000.0) -> np.ndarray:
    """Sinusoid embedding `[cos(v * f_k), sin(v * f_k)]`, f_k = max_period^(-k / (dim/2)); float32, shape (N, dim)."""
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / half)
    args = np.asarray(values, dtype=np.float32).reshape(-1, 1) * freqs[None, :]
    emb = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
    if dim % 2:
        emb = np.concatenate([emb, np.zeros_like(emb[:, :1])], axis=-1)
    return emb.astype(np.float32)


def timestep_embedding(timesteps: ms.Tensor, dim: int, max_period: float = 10000.0) -> ms.Tensor:
    """The same sinusoid as `timestep_embedding_np`, as MindSpore ops (cos first, float32), for use inside graphs."""
    half = dim // 2
    freqs = ms.Tensor(np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / half))
    args = ops.expand_dims(timesteps.astype(ms.float32), 1) * ops.expand_dims(freqs, 0)
    emb = ops.concat((ops.cos(args), ops.sin(args)), axis=-1)
    if dim % 2:
        emb = ops.concat((emb, ops.zeros_like(emb[:, :1])), axis=-1)
    return emb


# Above this many bytes of im2col columns, a convolution uses MindSpore's own kernel (full-size VAE decoders on CPU).
IM2COL_MAX_BYTES = 1 << 30


def im2col_convolution() -> bool:
    """Whether convolutions built now run as im2col + one matmul: on CPU, unless PANGUDRAW_CONV=native.

    On the 2-core machines of this project MindSpore 2.10's CPU convolution kernel ran at 0.1-0.7 GMAC/s at the
    sizes our networks use, where `ops.unfold` + `ops.matmul` computes the same sums 13-57x faster forward and 6-14x
    faster forward + backward (benchmarks/results/conv_cpu.json; the bench-small UNet forward at batch 2: 4.48 s
    native, 0.245 s im2col). On Ascend the native kernel (the cube unit) is used.
    """
    mode = os.environ.get("PANGUDRAW_CONV", "auto")
    if mode not in ("auto", "native", "im2col"):
        raise ValueError(f"PANGUDRAW_CONV must be auto, native or im2col, got {mode!r}")
    if mode != "auto":
        return mode == "im2col"
    return ms.get_context("device_target") == "CPU"


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` with symmetric zero padding: the same parameters (`weight`, `bias`), names, initialisation and
    sums; on CPU computed as im2col (`ops.unfold`) and one matmul (see `im2col_convolution`)."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, padding: int = 0,
                 has_bias: bool = True, dtype=ms.float32):
        super().__init__(cin, cout, kernel, stride=stride, pad_mode="pad" if padding else "valid", padding=padding,
                         has_bias=has_bias, dtype=dtype)
        self.kernel, self.step, self.pad_size, self.cout = kernel, stride, padding, cout
        self.im2col = im2col_convolution()

    def construct(self, x):
        return self.convolve(x)

    def convolve(self, x):
        """The convolution (subclasses with another calling convention call this)."""
        b, c, h, w = x.shape
        k, s, p = self.kernel, self.step, self.pad_size
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        if not self.im2col or b * c * k * k * ho * wo * 4 > IM2COL_MAX_BYTES:
            y = self.conv2d(x, self.weight)  # nn.Conv2d's own primitive
        else:
            weight = self.weight.reshape(self.cout, c * k * k)
            if k == 1 and s == 1 and p == 0:
                y = ops.matmul(weight, x.reshape(b, c, h * w))
            else:
                y = ops.matmul(weight, ops.unfold(x, kernel_size=k, padding=p, stride=s))
            y = y.reshape(b, self.cout, ho, wo)
        if self.has_bias:
            y = y + self.bias.reshape(1, self.cout, 1, 1)
        return y


class GroupNorm32(nn.Cell):
    """GroupNorm over (B, C, ...) computed in float32; parameters `gamma`/`beta` in the net's dtype.

    The group sums are matrix-vector products and the affine is folded into one per-channel scale: on CPU this
    runs about twice as fast as MindSpore's GroupNorm kernel, with the same two-pass (mean, then variance) numerics.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, dtype=ms.float32):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels not divisible into {num_groups} groups")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.gamma = Parameter(initializer("ones", (num_channels,), dtype), name="gamma")
        self.beta = Parameter(initializer("zeros", (num_channels,), dtype), name="beta")

    def construct(self, x):
        in_dtype = x.dtype
        shape = x.shape
        b, c = shape[0], shape[1]
        groups = self.num_groups
        per_group = c // groups
        rows = ops.reshape(x.astype(ms.float32), (b * groups, -1))
        width = rows.shape[1]
        # A float32 constant: dividing by the Python int `width` gave a float64 averager at large widths (131072).
        averager = ops.full((width, 1), 1.0 / width, dtype=ms.float32)
        centred = rows - ops.matmul(rows, averager)
        var = ops.matmul(centred * centred, averager)
        scale = ops.reshape(ops.rsqrt(var + self.eps), (b, groups, 1, 1)) * ops.reshape(
            self.gamma.astype(ms.float32), (1, groups, per_group, 1))
        y = ops.reshape(centred, (b, groups, per_group, -1)) * scale + ops.reshape(
            self.beta.astype(ms.float32), (1, groups, per_group, 1))
        return ops.reshape(y, shape).astype(in_dtype)

    def extend_repr(self):
        return f"num_groups={self.num_groups}, num_channels={self.num_channels}, eps={self.eps}"


class LayerNorm32(nn.Cell):
    """LayerNorm over the last axis computed in float32; parameters `gamma`/`beta` in the net's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5, dtype=ms.float32):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.gamma = Parameter(initializer("ones", (dim,), dtype), name="gamma")
        self.beta = Parameter(initializer("zeros", (dim,), dtype), name="beta")
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        in_dtype = x.dtype
        y, _, _ = self.layer_norm(x.astype(ms.float32), self.gamma.astype(ms.float32), self.beta.astype(ms.float32))
        return y.astype(in_dtype)

    def extend_repr(self):
        return f"dim={self.dim}, eps={self.eps}"


def gelu_exact(x):
    """GELU with the exact erf (not the tanh form), in float32 inside.

    erf comes from Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, below float32 resolution of GELU's output):
    a handful of elementwise ops that run about twice as fast on CPU as the Erf kernel.
    """
    in_dtype = x.dtype
    x = x.astype(ms.float32)
    z = ops.abs(x) * 0.7071067811865476
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf_abs = 1.0 - poly * ops.exp(-z * z)
    # x * erf(x / sqrt2) == |x| * erf(|x| / sqrt2), so only erf on non-negative inputs is needed.
    return (0.5 * x + 0.5 * ops.abs(x) * erf_abs).astype(in_dtype)


def multi_head_attention(q, k, v, heads: int):
    """Softmax attention of q (B, N, H*D) over k, v (B, M, H*D); returns (B, N, H*D).

    The 1/sqrt(D) scale is folded into q before the product, and the softmax runs in float32.
    """
    b, n, inner = q.shape
    m = k.shape[1]
    d = inner // heads
    q = ops.transpose(ops.reshape(q * (d ** -0.5), (b, n, heads, d)), (0, 2, 1, 3))
    k = ops.transpose(ops.reshape(k, (b, m, heads, d)), (0, 2, 1, 3))
    v = ops.transpose(ops.reshape(v, (b, m, heads, d)), (0, 2, 1, 3))
    scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2)))
    probs = ops.softmax(scores.astype(ms.float32), axis=-1).astype(v.dtype)
    out = ops.matmul(probs, v)
    return ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (b, n, inner))


class Attention(nn.Cell):
    """Multi-head attention with `to_q`/`to_k`/`to_v` (no bias) and `to_out.0`; self-attention when no context."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 dtype=ms.float32):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Dense(query_dim, inner, has_bias=False, dtype=dtype)
        self.to_k = nn.Dense(context_dim, inner, has_bias=False, dtype=dtype)
        self.to_v = nn.Dense(context_dim, inner, has_bias=False, dtype=dtype)
        self.to_out = nn.SequentialCell([nn.Dense(inner, query_dim, dtype=dtype)])

    def construct(self, x, context=None):
        if context is None:
            context = x
        out = multi_head_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)
