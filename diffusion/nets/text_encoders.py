"""The two causal text transformers of PanGu-Draw's conditioner.

- `CLIPTextEncoder` (text encoder 1, `conditioner.embedders.0`): a CLIP ViT-L/14 text model in Hugging Face naming,
  fed by the Chinese WordPiece tokenizer; its output is the last layer after `final_layer_norm`.
- `OpenCLIPTextEncoder` (text encoder 2, `conditioner.embedders.1`): an OpenCLIP ViT-bigG/14 text tower; its output
  is the penultimate layer (no final norm) and the pooled vector ln_final(last layer)[EOT] @ text_projection.

Parameter names equal the released names without the component prefix, in MindSpore naming (`gamma`/`beta`,
`embedding_table`, Dense weight (out, in)). Layer norms and softmax run in float32 whatever the dtype; inputs are
int32 token ids (B, L) with L <= context_length, outputs are float32.
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Constant, Normal, Uniform, initializer

from diffusion.config import TextEncoderConfig
from diffusion.nets.layers import LayerNorm32

# Both CLIP implementations use LayerNorm eps 1e-5.
_LN_EPS = 1e-5


def _layer_norm(width: int, dtype: ms.Type) -> LayerNorm32:
    return LayerNorm32(width, eps=_LN_EPS, dtype=dtype)


class _Embedding(nn.Cell):
    """A lookup table named `embedding_table` (vocab, width)."""

    def __init__(self, rows: int, width: int, dtype: ms.Type, std: float = 0.02):
        super().__init__()
        self.embedding_table = Parameter(initializer(Normal(std), (rows, width), dtype))

    def construct(self, ids):
        return ops.gather(self.embedding_table, ids, 0)


def _check_activation(name: str) -> bool:
    """True for quick_gelu (OpenAI CLIP), False for exact erf GELU (OpenCLIP bigG)."""
    if name not in ("quick_gelu", "gelu"):
        raise ValueError(f"unknown activation {name!r}")
    return name == "quick_gelu"


def _act(x, quick: bool):
    if quick:
        return x * ops.sigmoid(1.702 * x)
    return ops.gelu(x, approximate="none")


def _causal_mask(length: int) -> ms.Tensor:
    """Additive float32 mask: position i may attend to positions <= i."""
    return ms.Tensor(np.triu(np.full((length, length), -np.inf, dtype=np.float32), 1))


def _attention(q, k, v, heads: int, mask):
    """Multi-head attention on (B, L, W) projections; q must already carry the 1/sqrt(head width) scale."""
    b, length, width = q.shape
    d = width // heads
    q = q.reshape(b, length, heads, d).transpose(0, 2, 1, 3)
    k = k.reshape(b, length, heads, d).transpose(0, 2, 3, 1)
    v = v.reshape(b, length, heads, d).transpose(0, 2, 1, 3)
    scores = ops.matmul(q, k).astype(ms.float32) + mask[:length, :length]
    weights = ops.softmax(scores, axis=-1).astype(v.dtype)
    return ops.matmul(weights, v).transpose(0, 2, 1, 3).reshape(b, length, width)


def _check_heads(cfg: TextEncoderConfig) -> None:
    if cfg.width % cfg.heads:
        raise ValueError(f"text encoder width {cfg.width} is not divisible by {cfg.heads} heads")


# ---------------------------------------------------------------- text encoder 1: Hugging Face CLIP layout


class _CLIPAttention(nn.Cell):
    def __init__(self, width: int, heads: int, dtype: ms.Type):
        super().__init__()
        self.k_proj = nn.Dense(width, width, dtype=dtype)
        self.v_proj = nn.Dense(width, width, dtype=dtype)
        self.q_proj = nn.Dense(width, width, dtype=dtype)
        self.out_proj = nn.Dense(width, width, dtype=dtype)
        self.heads = heads
        self.scale = (width // heads) ** -0.5

    def construct(self, x, mask):
        out = _attention(self.q_proj(x) * self.scale, self.k_proj(x), self.v_proj(x), self.heads, mask)
        return self.out_proj(out)


class _CLIPMLP(nn.Cell):
    def __init__(self, width: int, act: str, dtype: ms.Type):
        super().__init__()
        self.fc1 = nn.Dense(width, 4 * width, dtype=dtype)
        self.fc2 = nn.Dense(4 * width, width, dtype=dtype)
        self.quick = _check_activation(act)

    def construct(self, x):
        return self.fc2(_act(self.fc1(x), self.quick))


class _CLIPEncoderLayer(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, dtype: ms.Type):
        super().__init__()
        self.self_attn = _CLIPAttention(cfg.width, cfg.heads, dtype)
        self.layer_norm1 = _layer_norm(cfg.width, dtype)
        self.mlp = _CLIPMLP(cfg.width, cfg.act, dtype)
        self.layer_norm2 = _layer_norm(cfg.width, dtype)

    def construct(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class _CLIPEmbeddings(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, dtype: ms.Type):
        super().__init__()
        self.token_embedding = _Embedding(cfg.vocab_size, cfg.width, dtype, std=0.02)
        self.position_embedding = _Embedding(cfg.context_length, cfg.width, dtype, std=0.01)

    def construct(self, ids):
        length = ids.shape[1]
        return self.token_embedding(ids) + self.position_embedding.embedding_table[:length]


class _CLIPEncoder(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, dtype: ms.Type):
        super().__init__()
        self.layers = nn.CellList([_CLIPEncoderLayer(cfg, dtype) for _ in range(cfg.layers)])


class _CLIPTextTransformer(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, dtype: ms.Type):
        super().__init__()
        self.embeddings = _CLIPEmbeddings(cfg, dtype)
        self.encoder = _CLIPEncoder(cfg, dtype)
        self.final_layer_norm = _layer_norm(cfg.width, dtype)


class _CLIPTextModel(nn.Cell):
    """Holds `text_model`, as Hugging Face's CLIPTextModel does, so names match the checkpoint."""

    def __init__(self, cfg: TextEncoderConfig, dtype: ms.Type):
        super().__init__()
        self.text_model = _CLIPTextTransformer(cfg, dtype)


class CLIPTextEncoder(nn.Cell):
    """Text encoder 1 (`layout="hf_clip"`): ids (B, L) -> hidden states (B, L, width).

    `output_layer="last"`: the last layer after `final_layer_norm` (PanGu-Draw's setting);
    `"penultimate"`: the input of the last layer, without the final norm.
    """

    def __init__(self, cfg: TextEncoderConfig, dtype: ms.Type = ms.float32):
        super().__init__()
        if cfg.layout != "hf_clip":
            raise ValueError(f"CLIPTextEncoder needs layout 'hf_clip', got {cfg.layout!r}")
        if cfg.projection_dim:
            raise ValueError("the hf_clip text encoder has no projection; set projection_dim=0")
        _check_heads(cfg)
        self.cfg = cfg
        self.compute_dtype = dtype
        self.transformer = _CLIPTextModel(cfg, dtype)
        self.mask = _causal_mask(cfg.context_length)
        self.penultimate = cfg.output_layer == "penultimate"

    def construct(self, ids):
        tm = self.transformer.text_model
        x = tm.embeddings(ids.astype(ms.int32))
        layers = tm.encoder.layers
        n = len(layers)
        for i in range(n - 1):
            x = layers[i](x, self.mask)
        if self.penultimate:
            return x.astype(ms.float32)
        x = layers[n - 1](x, self.mask)
        return tm.final_layer_norm(x).astype(ms.float32)


# ---------------------------------------------------------------- text encoder 2: OpenCLIP layout


class _PackedSelfAttention(nn.Cell):
    """torch.nn.MultiheadAttention's layout: one packed `in_proj_weight` (3W, W) for q, k, v, then `out_proj`."""

    def __init__(self, width: int, heads: int, dtype: ms.Type):
        super().__init__()
        bound = 1.0 / math.sqrt(width)
        self.in_proj_weight = Parameter(initializer(Uniform(bound), (3 * width, width), dtype))
        self.in_proj_bias = Parameter(initializer("zeros", (3 * width,), dtype))
        self.out_proj = nn.Dense(width, width, dtype=dtype)
        self.heads = heads
        self.width = width
        self.scale = (width // heads) ** -0.5

    def construct(self, x, mask):
        qkv = ops.matmul(x, self.in_proj_weight.transpose(1, 0)) + self.in_proj_bias
        w = self.width
        q = qkv[:, :, :w] * self.scale
        out = _attention(q, qkv[:, :, w:2 * w], qkv[:, :, 2 * w:], self.heads, mask)
        return self.out_proj(out)


class _OpenCLIPMLP(nn.Cell):
    def __init__(self, width: int, act: str, dtype: ms.Type):
        super().__init__()
        self.c_fc = nn.Dense(width, 4 * width, dtype=dtype)
        self.c_proj = nn.Dense(4 * width, width, dtype=dtype)
        self.quick = _check_activation(act)

    def construct(self, x):
        return self.c_proj(_act(self.c_fc(x), self.quick))


class _ResidualAttentionBlock(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, dtype: ms.Type):
        super().__init__()
        self.ln_1 = _layer_norm(cfg.width, dtype)
        self.attn = _PackedSelfAttention(cfg.width, cfg.heads, dtype)
        self.ln_2 = _layer_norm(cfg.width, dtype)
        self.mlp = _OpenCLIPMLP(cfg.width, cfg.act, dtype)

    def construct(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class _OpenCLIPTransformer(nn.Cell):
    def __init__(self, cfg: TextEncoderConfig, dtype: ms.Type):
        super().__init__()
        self.resblocks = nn.CellList([_ResidualAttentionBlock(cfg, dtype) for _ in range(cfg.layers)])


class _OpenCLIPTextModel(nn.Cell):
    """The text tower of an OpenCLIP model; `logit_scale` is unused here but is part of the checkpoint."""

    def __init__(self, cfg: TextEncoderConfig, dtype: ms.Type):
        super().__init__()
        self.token_embedding = _Embedding(cfg.vocab_size, cfg.width, dtype, std=0.02)
        self.positional_embedding = Parameter(initializer(Normal(0.01), (cfg.context_length, cfg.width), dtype))
        self.transformer = _OpenCLIPTransformer(cfg, dtype)
        self.ln_final = _layer_norm(cfg.width, dtype)
        self.text_projection = Parameter(
            initializer(Normal(cfg.width ** -0.5), (cfg.width, cfg.projection_dim), dtype))
        self.logit_scale = Parameter(initializer(Constant(math.log(1 / 0.07)), (), dtype))


class OpenCLIPTextEncoder(nn.Cell):
    """Text encoder 2 (`layout="open_clip"`): ids (B, L) -> (hidden (B, L, width), pooled (B, projection_dim)).

    hidden is the penultimate layer without the final norm (`output_layer="penultimate"`, PanGu-Draw's setting)
    or the last layer without it (`"last"`), as sgm's non-legacy OpenCLIP embedder returns them.
    pooled = ln_final(last layer) at each row's EOT position @ text_projection, where the EOT position is that of
    the row's highest token id (the tokenizer gives EOT the highest id).
    """

    def __init__(self, cfg: TextEncoderConfig, dtype: ms.Type = ms.float32):
        super().__init__()
        if cfg.layout != "open_clip":
            raise ValueError(f"OpenCLIPTextEncoder needs layout 'open_clip', got {cfg.layout!r}")
        if cfg.projection_dim <= 0:
            raise ValueError("the open_clip text encoder needs projection_dim > 0 for its pooled output")
        _check_heads(cfg)
        self.cfg = cfg
        self.compute_dtype = dtype
        self.model = _OpenCLIPTextModel(cfg, dtype)
        self.mask = _causal_mask(cfg.context_length)
        self.penultimate = cfg.output_layer == "penultimate"

    def construct(self, ids):
        m = self.model
        ids = ids.astype(ms.int32)
        length = ids.shape[1]
        x = m.token_embedding(ids) + m.positional_embedding[:length]
        blocks = m.transformer.resblocks
        n = len(blocks)
        for i in range(n - 1):
            x = blocks[i](x, self.mask)
        penultimate = x
        x = blocks[n - 1](x, self.mask)
        hidden = penultimate if self.penultimate else x
        # Select the EOT row with a one-hot product: exact, and compiles to plain matmuls.
        eot = ops.one_hot(ops.argmax(ids, dim=-1), length, ms.Tensor(1.0, ms.float32), ms.Tensor(0.0, ms.float32))
        final = m.ln_final(x).astype(ms.float32)
        pooled_hidden = ops.bmm(eot.expand_dims(1), final).squeeze(1)
        pooled = ops.matmul(pooled_hidden, m.text_projection.astype(ms.float32))
        return hidden.astype(ms.float32), pooled


def build_text_encoder(cfg: TextEncoderConfig, dtype: ms.Type = ms.float32) -> CLIPTextEncoder | OpenCLIPTextEncoder:
    """The encoder class for `cfg.layout`."""
    if cfg.layout == "hf_clip":
        return CLIPTextEncoder(cfg, dtype)
    if cfg.layout == "open_clip":
        return OpenCLIPTextEncoder(cfg, dtype)
    raise ValueError(f"unknown text encoder layout {cfg.layout!r}")
