"""The SDXL-layout VAE: released names and shapes at full size (lazily built), tiny-config behaviour on CPU."""
from __future__ import annotations

import os
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore.nn.utils import no_init_parameters

from diffusion.config import PANGU_DRAW_V3, tiny_config
from diffusion.nets.vae import AutoencoderKL, _Downsample, _SpatialSelfAttention, _Upsample

REFERENCE_KEYS = Path(os.environ.get(
    "PANGUDRAW_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"
)) / "sdxl_base_mindspore_keys.txt"


def reference_shapes(prefix: str) -> dict[str, tuple[int, ...]]:
    """Released MindSpore names (minus `prefix`) and shapes from the SDXL-base key list."""
    if not REFERENCE_KEYS.is_file():
        pytest.skip(f"reference key list not found at {REFERENCE_KEYS} (set PANGUDRAW_REFERENCE_DIR)")
    out = {}
    for line in REFERENCE_KEYS.read_text().splitlines():
        name, _, shape = line.partition(":")
        if name.startswith(prefix):
            dims = shape.strip("()").replace(" ", "")
            out[name[len(prefix):]] = tuple(int(d) for d in dims.split(",") if d)
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def tiny_vae():
    ms.set_seed(0)
    return AutoencoderKL(tiny_config().vae)


def _images(b=2, h=16, w=24, seed=0):
    return ms.Tensor(np.random.default_rng(seed).uniform(-1, 1, (b, 3, h, w)).astype(np.float32))


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc to read resident memory")
def test_full_size_names_and_shapes_match_release_without_allocating():
    expected = reference_shapes("first_stage_model.")
    assert len(expected) == 248
    before = rss_bytes()
    with no_init_parameters():
        vae = AutoencoderKL(PANGU_DRAW_V3.vae)
    grown = rss_bytes() - before
    params = list(vae.get_parameters())
    ours = {p.name: tuple(p.shape) for p in params}
    assert ours == expected
    assert [n for n, _ in vae.parameters_and_names()] == [p.name for p in params]
    # 83.65M float32 weights would take 335 MB; lazily built, none of them is materialised.
    assert sum(int(np.prod(s)) for s in ours.values()) == 83_653_863
    assert all(p.has_init for p in params)
    assert grown < 64 * 2**20, f"building the lazy VAE grew resident memory by {grown / 2**20:.0f} MiB"


def test_encode_decode_shapes(tiny_vae):
    cfg = tiny_config().vae
    f = 2 ** (len(cfg.ch_mult) - 1)
    assert tiny_vae.downsample_factor == f == 4
    assert tiny_vae.scale_factor == cfg.scale_factor
    mean, logvar = tiny_vae.encode(_images(2, 16, 24))
    assert mean.shape == logvar.shape == (2, cfg.embed_dim, 16 // f, 24 // f)
    assert mean.dtype == ms.float32
    x = tiny_vae.decode(mean)
    assert x.shape == (2, 3, 16, 24) and x.dtype == ms.float32
    assert np.isfinite(x.asnumpy()).all()


def test_jit_equals_eager(tiny_vae):
    images = _images(2, 16, 16, seed=1)
    mean, logvar = tiny_vae.encode(images)
    jit_mean, jit_logvar = ms.jit(tiny_vae.encode)(images)
    np.testing.assert_allclose(jit_mean.asnumpy(), mean.asnumpy(), atol=1e-5)
    np.testing.assert_allclose(jit_logvar.asnumpy(), logvar.asnumpy(), atol=1e-5)
    z = ms.Tensor(np.random.default_rng(2).standard_normal((2, 4, 4, 4)).astype(np.float32))
    np.testing.assert_allclose(ms.jit(tiny_vae.decode)(z).asnumpy(), tiny_vae.decode(z).asnumpy(), atol=1e-5)


def test_batch_equals_rows_one_by_one(tiny_vae):
    images = _images(3, 16, 16, seed=3)
    mean, _ = tiny_vae.encode(images)
    decoded = tiny_vae.decode(mean).asnumpy()
    for i in range(3):
        row_mean, _ = tiny_vae.encode(images[i:i + 1])
        np.testing.assert_allclose(row_mean.asnumpy()[0], mean.asnumpy()[i], atol=1e-5)
        np.testing.assert_allclose(tiny_vae.decode(mean[i:i + 1]).asnumpy()[0], decoded[i], atol=1e-5)


def test_logvar_is_clamped_as_ldm():
    ms.set_seed(0)
    vae = AutoencoderKL(tiny_config().vae)
    bias = vae.quant_conv.bias.asnumpy().copy()
    bias[4:] = 1e4
    vae.quant_conv.bias.set_data(ms.Tensor(bias))
    _, logvar = vae.encode(_images(1, 8, 8))
    assert np.all(logvar.asnumpy() == 20.0)


def test_downsample_pads_right_and_bottom_only():
    ms.set_seed(1)
    down = _Downsample(2, ms.float32)
    x = np.random.default_rng(4).standard_normal((1, 2, 5, 5)).astype(np.float32)
    out = down(ms.Tensor(x)).asnumpy()
    w, b = down.conv.weight.asnumpy(), down.conv.bias.asnumpy()
    padded = np.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1)))
    expected = np.empty((1, 2, 2, 2), np.float32)
    for i in range(2):
        for j in range(2):
            patch = padded[0, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            expected[0, :, i, j] = np.einsum("oikl,ikl->o", w, patch) + b
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_upsample_is_nearest_then_conv():
    up = _Upsample(2, ms.float32)
    identity = np.zeros((2, 2, 3, 3), np.float32)
    identity[0, 0, 1, 1] = identity[1, 1, 1, 1] = 1.0
    up.conv.weight.set_data(ms.Tensor(identity))
    up.conv.bias.set_data(ms.Tensor(np.zeros(2, np.float32)))
    x = np.arange(12, dtype=np.float32).reshape(1, 2, 2, 3)
    out = up(ms.Tensor(x)).asnumpy()
    np.testing.assert_array_equal(out, x.repeat(2, axis=2).repeat(2, axis=3))


def test_mid_attention_matches_numpy():
    ms.set_seed(2)
    c, groups = 8, 2
    attn = _SpatialSelfAttention(c, groups, ms.float32)
    rng = np.random.default_rng(5)
    attn.norm.gamma.set_data(ms.Tensor(rng.uniform(0.5, 1.5, c).astype(np.float32)))
    attn.norm.beta.set_data(ms.Tensor(rng.standard_normal(c).astype(np.float32)))
    x = rng.standard_normal((2, c, 3, 4)).astype(np.float32)
    out = attn(ms.Tensor(x)).asnumpy()

    g = x.reshape(2, groups, -1)
    norm = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6)).reshape(x.shape)
    norm = norm * attn.norm.gamma.asnumpy()[:, None, None] + attn.norm.beta.asnumpy()[:, None, None]

    def conv1x1(cell, t):
        return np.einsum("oi,bihw->bohw", cell.weight.asnumpy()[:, :, 0, 0], t) + cell.bias.asnumpy()[:, None, None]

    q, k, v = (conv1x1(m, norm).reshape(2, c, -1) for m in (attn.q, attn.k, attn.v))
    scores = np.einsum("bci,bcj->bij", q, k) / np.sqrt(c)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    mixed = np.einsum("bcj,bij->bci", v, weights).reshape(x.shape)
    np.testing.assert_allclose(out, x + conv1x1(attn.proj_out, mixed), atol=1e-4)


def test_float16_weights_decode_close_to_float32():
    cfg = tiny_config().vae
    ms.set_seed(3)
    vae32 = AutoencoderKL(cfg)
    ms.set_seed(3)
    vae16 = AutoencoderKL(cfg, dtype=ms.float16)
    assert vae16.decoder.conv_in.weight.dtype == ms.float16
    assert vae16.decoder.mid.attn_1.norm.gamma.dtype == ms.float16
    z = ms.Tensor(np.random.default_rng(6).standard_normal((1, 4, 4, 4)).astype(np.float32))
    ref, half = vae32.decode(z).asnumpy(), vae16.decode(z)
    assert half.dtype == ms.float32
    np.testing.assert_allclose(half.asnumpy(), ref, atol=0.03)


def test_patch_mean_init_makes_an_exact_patch_mean_autoencoder():
    """The shipped VAE's starting point: decode(encode(x)) is x averaged over f x f patches, for any colours."""
    from diffusion.training.vae_trainer import patch_mean_init

    cfg = tiny_config().vae.model_copy(update={"norm_groups": 0, "mid_attention": False})
    ms.set_seed(3)
    vae = AutoencoderKL(cfg)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 16, 24)).astype(np.float32)
    mean_before, _ = vae.encode(ms.Tensor(x))
    patch_mean_init(vae)
    mean, _ = vae.encode(ms.Tensor(x))
    f = cfg.downsample_factor
    pooled = x.reshape(2, 3, 16 // f, f, 24 // f, f).mean(axis=(3, 5))
    # Latent channels 0-2 hold the patch means; channel 3 keeps random weights (something for training to use).
    np.testing.assert_allclose(mean.asnumpy()[:, :3], pooled, atol=1e-5)
    assert np.abs(mean.asnumpy()[:, 3]).max() > 1e-3
    recon = vae.decode(mean).asnumpy()
    np.testing.assert_allclose(recon, np.repeat(np.repeat(pooled, f, axis=2), f, axis=3), atol=1e-5)
    assert not np.allclose(mean_before.asnumpy()[:, :3], pooled, atol=0.05)


def test_patch_mean_init_refuses_a_vae_with_norms():
    from diffusion.training.vae_trainer import patch_mean_init

    with pytest.raises(ValueError, match="norm_groups 0"):
        patch_mean_init(AutoencoderKL(tiny_config().vae))
