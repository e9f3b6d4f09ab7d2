"""The UNet: released naming at full size (without allocating it), shapes, graph mode, batching, shared layers."""
from __future__ import annotations

import math
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore.nn.utils import no_init_parameters

from diffusion.config import BENCH_SMALL_UNET, PANGU_DRAW_V3, tiny_config
from diffusion.nets import layers
from diffusion.nets.unet import ResBlock, UNet, count_parameters, depth_to_space, position_grid, space_to_depth

# The shared reference folder sits beside the repository checkout.
REFERENCE_KEYS = Path(__file__).resolve().parents[2] / "shared/reference/sdxl_base_mindspore_keys.txt"
PREFIX = "model.diffusion_model."
TINY = tiny_config().structure_unet


def randomize(cell, seed: int) -> None:
    """Seeded random weights (norm scales near 1) so outputs depend on every parameter."""
    rng = np.random.default_rng(seed)
    for name, p in cell.parameters_and_names():
        shape = tuple(p.shape)
        if name.endswith("gamma"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) > 1:
            value = rng.standard_normal(shape) / math.sqrt(int(np.prod(shape[1:])))
        else:
            value = 0.1 * rng.standard_normal(shape)
        p.set_data(ms.Tensor(value.astype(np.float32)).astype(p.dtype))


def tiny_inputs(batch: int, seed: int = 0, side: int = 16):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, TINY.in_channels, side, side)).astype(np.float32)
    t = rng.integers(0, 1000, size=batch).astype(np.int32)
    context = rng.standard_normal((batch, 77, TINY.context_dim)).astype(np.float32)
    y = rng.standard_normal((batch, TINY.adm_in_channels)).astype(np.float32)
    return x, t, context, y


def run(fn, x, t, context, y) -> np.ndarray:
    return fn(ms.Tensor(x), ms.Tensor(t), ms.Tensor(context), ms.Tensor(y)).asnumpy()


@pytest.fixture(scope="module")
def tiny_unet():
    net = UNet(TINY)
    net.set_train(False)
    randomize(net, seed=1)
    return net


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not REFERENCE_KEYS.exists(), reason=f"reference key list not found at {REFERENCE_KEYS}")
def test_full_size_names_and_shapes_match_the_release_without_allocating_weights():
    reference = {}
    for line in REFERENCE_KEYS.read_text().splitlines():
        name, shape = line.split(":", 1)
        if name.startswith(PREFIX):
            reference[name[len(PREFIX):]] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    # PanGu-Draw v3's label embedding reads pooled text 1280 + bucket sinusoid 256 (SDXL: 2816).
    reference["label_emb.0.0.weight"] = (1280, 1536)

    before = _rss_bytes()
    with no_init_parameters():
        net = UNet(PANGU_DRAW_V3.structure_unet)
    grown = _rss_bytes() - before

    ours = {name: tuple(p.shape) for name, p in net.parameters_and_names()}
    assert len(reference) == 1680
    assert set(ours) == set(reference)
    assert {n: s for n, s in ours.items() if reference[n] != s} == {}
    assert count_parameters(net) == 2_565_825_284
    # The fp32 weights would take 10.3 GB; lazily initialised parameters hold no data.
    assert all(p.has_init for p in net.get_parameters())
    assert grown < 1 << 30, f"building the full-size UNet grew RSS by {grown / 2**20:.0f} MiB"


def test_bench_small_has_the_documented_size():
    with no_init_parameters():
        net = UNet(BENCH_SMALL_UNET)
    assert count_parameters(net) == 32_803_972


def test_output_shape_dtype_and_integer_or_float_timesteps(tiny_unet):
    x, t, context, y = tiny_inputs(2, side=24)
    eps_int = run(tiny_unet, x, t, context, y)
    eps_float = run(tiny_unet, x, t.astype(np.float32), context, y)
    assert eps_int.shape == (2, TINY.out_channels, 24, 24)
    assert eps_int.dtype == np.float32
    assert np.isfinite(eps_int).all() and eps_int.std() > 0.05
    np.testing.assert_allclose(eps_int, eps_float, rtol=0, atol=1e-6)
    # Every conditioning input matters.
    for changed in ((x, t + 1, context, y), (x, t, context + 0.5, y), (x, t, context, y + 0.5)):
        assert np.abs(run(tiny_unet, *changed) - eps_int).max() > 1e-4


def test_graph_mode_equals_eager(tiny_unet):
    x, t, context, y = tiny_inputs(2, seed=3)
    eager = run(tiny_unet, x, t, context, y)
    graph = run(ms.jit(tiny_unet.construct), x, t, context, y)
    np.testing.assert_allclose(graph, eager, rtol=1e-5, atol=1e-5)


def test_a_batch_equals_its_rows_one_by_one(tiny_unet):
    x, t, context, y = tiny_inputs(3, seed=4)
    batch = run(tiny_unet, x, t, context, y)
    for i in range(3):
        row = run(tiny_unet, x[i:i + 1], t[i:i + 1], context[i:i + 1], y[i:i + 1])
        np.testing.assert_allclose(row[0], batch[i], rtol=1e-5, atol=1e-5)


def test_float16_net_tracks_the_float32_net(tiny_unet):
    half = UNet(TINY, dtype=ms.float16)
    half.set_train(False)
    params = dict(half.parameters_and_names())
    assert {p.dtype for p in params.values()} == {ms.float16}
    for name, p in tiny_unet.parameters_and_names():
        params[name].set_data(ms.Tensor(p.asnumpy().astype(np.float16)))
    x, t, context, y = tiny_inputs(1, seed=5)
    full = run(tiny_unet, x, t, context, y)
    low = run(half, x, t, context, y)
    assert low.dtype == np.float32
    assert np.abs(low - full).max() < 0.05 * np.abs(full).max()


def test_position_channels_are_the_pixels_places_fed_after_the_latents():
    grid = position_grid(ms.Tensor(np.zeros((2, 4, 3, 5), np.float32))).asnumpy()
    assert grid.shape == (2, 2, 3, 5)
    # Pixel centres in (-1, 1): x left to right along a row, y top to bottom down a column, the same in each row.
    np.testing.assert_allclose(grid[1, 0], np.broadcast_to([-0.8, -0.4, 0.0, 0.4, 0.8], (3, 5)), atol=1e-6)
    np.testing.assert_allclose(grid[0, 1], np.broadcast_to([[-2 / 3], [0.0], [2 / 3]], (3, 5)), atol=1e-6)
    # A UNet with position channels equals a six-channel UNet of the same weights fed the grid by hand.
    with_pos = UNet(TINY.model_copy(update={"position_channels": True}))
    by_hand = UNet(TINY.model_copy(update={"in_channels": TINY.in_channels + 2}))
    randomize(with_pos, seed=7)
    weights = dict(with_pos.parameters_and_names())
    assert tuple(weights["input_blocks.0.0.weight"].shape)[1] == TINY.in_channels + 2
    for name, p in by_hand.parameters_and_names():
        p.set_data(weights[name].data.copy())
    x, t, context, y = tiny_inputs(2, seed=5, side=8)
    x = np.concatenate([x, x], axis=3)  # 8x16: not square
    fed = np.concatenate([x, position_grid(ms.Tensor(x)).asnumpy()], axis=1)
    out = run(ms.jit(with_pos.construct), x, t, context, y)
    np.testing.assert_allclose(out, run(by_hand, fed, t, context, y), rtol=1e-5, atol=1e-5)
    # The grid channels carry weight: without them the output changes.
    assert np.abs(run(by_hand, np.concatenate([x, np.zeros_like(fed[:, 4:])], axis=1), t, context, y) - out).max() > 1e-3


def test_patch_size_folds_each_block_of_latent_pixels_into_channels_and_back():
    x = np.arange(2 * 3 * 4 * 6, dtype=np.float32).reshape(2, 3, 4, 6)
    folded = space_to_depth(ms.Tensor(x), 2).asnumpy()
    assert folded.shape == (2, 12, 2, 3)
    # Channel c*4 + i*2 + j at (u, v) is pixel (2u + i, 2v + j) of channel c.
    for c, i, j, u, v in [(0, 0, 0, 0, 0), (1, 1, 0, 1, 2), (2, 1, 1, 0, 1), (2, 0, 1, 1, 0)]:
        assert folded[1, c * 4 + i * 2 + j, u, v] == x[1, c, 2 * u + i, 2 * v + j]
    np.testing.assert_array_equal(depth_to_space(ms.Tensor(folded), 2).asnumpy(), x)
    # A patch-2 UNet equals a UNet of 16 input and output channels fed the folded latents by hand, unfolded after.
    cfg = TINY.model_copy(update={"patch_size": 2})
    assert cfg.downsample_factor == 2 * TINY.downsample_factor
    patched = UNet(cfg)
    by_hand = UNet(TINY.model_copy(update={"in_channels": 16, "out_channels": 16}))
    randomize(patched, seed=3)
    weights = dict(patched.parameters_and_names())
    assert tuple(weights["input_blocks.0.0.weight"].shape)[1] == 16 and tuple(weights["out.2.weight"].shape)[0] == 16
    for name, p in by_hand.parameters_and_names():
        p.set_data(weights[name].data.copy())
    x, t, context, y = tiny_inputs(2, seed=4, side=8)
    x = np.concatenate([x, x[:, :, :4]], axis=2)  # 12x8: not square
    out = run(ms.jit(patched.construct), x, t, context, y)
    assert out.shape == x.shape
    folded = space_to_depth(ms.Tensor(x), 2).asnumpy()
    expected = depth_to_space(ms.Tensor(run(by_hand, folded, t, context, y)), 2).asnumpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_scale_shift_norm_scales_and_shifts_the_second_norm_by_the_embedding():
    block = ResBlock(8, 16, 12, 4, scale_shift=True)
    randomize(block, seed=2)
    assert tuple(block.emb_layers[1].weight.shape) == (32, 12)
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((2, 8, 5, 6)).astype(np.float32))
    emb = ms.Tensor(rng.standard_normal((2, 12)).astype(np.float32))
    e = block.emb_layers(emb).asnumpy()[:, :, None, None]
    normed = block.out_layers[0](block.in_layers(x)).asnumpy()
    film = ms.Tensor((normed * (1.0 + e[:, :16]) + e[:, 16:]).astype(np.float32))
    expected = block.skip_connection(x).asnumpy() + block.out_layers[3](block.out_layers[1](film)).asnumpy()
    np.testing.assert_allclose(block(x, emb).asnumpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ms.jit(block.construct)(x, emb).asnumpy(), expected, rtol=1e-5, atol=1e-5)


def test_timestep_embedding_is_cos_then_sin():
    t = np.array([0.0, 1.0, 999.0], np.float32)
    emb = layers.timestep_embedding(ms.Tensor(t), 8).asnumpy()
    freqs = np.exp(-math.log(10000.0) * np.arange(4) / 4)
    expected = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layers.timestep_embedding_np(t, 8), expected, rtol=1e-5, atol=1e-5)
    assert emb[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_attention_matches_a_numpy_softmax_attention():
    rng = np.random.default_rng(6)
    q = rng.standard_normal((2, 5, 8)).astype(np.float32)
    k = rng.standard_normal((2, 7, 8)).astype(np.float32)
    v = rng.standard_normal((2, 7, 8)).astype(np.float32)
    out = layers.multi_head_attention(ms.Tensor(q), ms.Tensor(k), ms.Tensor(v), heads=2).asnumpy()
    expected = np.empty_like(q)
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        scores = q[:, :, sl] @ k[:, :, sl].transpose(0, 2, 1) / 2.0
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        expected[:, :, sl] = probs @ v[:, :, sl]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_group_norm_computes_in_float32_for_a_float16_input():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((2, 8, 4, 4)) * 300 + 1000).astype(np.float16)
    norm = layers.GroupNorm32(4, 8, eps=1e-5, dtype=ms.float16)
    out = norm(ms.Tensor(x))
    assert out.dtype == ms.float16
    g = x.astype(np.float64).reshape(2, 4, -1)
    expected = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(out.asnumpy().astype(np.float64), expected, atol=5e-3)


def test_upsample_and_downsample_halve_and_double_the_size():
    from diffusion.nets.unet import Downsample, Upsample

    x = ms.Tensor(np.arange(2 * 4 * 4, dtype=np.float32).reshape(1, 2, 4, 4))
    up = Upsample(2)
    w = np.zeros((2, 2, 3, 3), np.float32)
    w[0, 0, 1, 1] = w[1, 1, 1, 1] = 1.0  # identity kernel: exposes the nearest-neighbour copy
    up.conv.weight.set_data(ms.Tensor(w))
    up.conv.bias.set_data(ms.Tensor(np.zeros(2, np.float32)))
    doubled = up(x).asnumpy()
    assert doubled.shape == (1, 2, 8, 8)
    np.testing.assert_array_equal(doubled, np.repeat(np.repeat(x.asnumpy(), 2, axis=2), 2, axis=3))
    assert Downsample(2)(x).shape == (1, 2, 2, 2)


def test_upsampling_to_an_odd_side_is_nearest_to_that_size_then_the_convolution():
    """Where a stride-2 level rounded an odd side up, the way back up lands on that side: nearest-neighbour to the
    size (pixel i reads floor(i * n / m)), then the convolution, whose border is zero at the new edge."""
    from diffusion.nets.unet import Upsample

    x = np.arange(2 * 4 * 3, dtype=np.float32).reshape(1, 2, 4, 3) + 1.0
    up = Upsample(2)
    up.conv.bias.set_data(ms.Tensor(np.zeros(2, np.float32)))
    w = np.zeros((2, 2, 3, 3), np.float32)
    w[0, 0, 1, 1] = w[1, 1, 1, 1] = 1.0  # identity
    up.conv.weight.set_data(ms.Tensor(w))
    out = up.to_size(ms.Tensor(x), 7, 5).asnumpy()
    rows, cols = (np.arange(7) * 4) // 7, (np.arange(5) * 3) // 5
    np.testing.assert_array_equal(out, x[:, :, rows][:, :, :, cols])
    w = np.zeros((2, 2, 3, 3), np.float32)
    w[0, 0, 2, 1] = w[1, 1, 2, 1] = 1.0  # each output pixel reads the pixel below it
    up.conv.weight.set_data(ms.Tensor(w))
    shifted = up.to_size(ms.Tensor(x), 7, 5).asnumpy()
    np.testing.assert_array_equal(shifted[:, :, :6], out[:, :, 1:])
    assert not shifted[:, :, 6].any()  # the row past the new edge is padding, not the dropped x2 row


def test_a_unet_takes_latent_sides_its_levels_do_not_divide():
    """The tiny preset's two levels with patch 2 (as the shipped structure generator) on the latents of three aspect
    buckets at scale 1/8: 14x18 folds to 7x9, which the stride-2 level takes to 4x5 and the way up brings back to
    7x9; 10x24 folds to 5x12; 8x32 to 4x16, even throughout. Every bucket's latent sides are even, so all fold."""
    from diffusion import buckets

    cfg = TINY.model_copy(update={"patch_size": 2})
    net = UNet(cfg)
    net.set_train(False)
    randomize(net, seed=6)
    graph = ms.jit(net.construct)
    _, t, context, y = tiny_inputs(1, seed=7)
    sides = sorted({(h // 4, w // 4) for w, h in buckets.bucket_sizes(0.125)})
    assert (14, 18) in sides and all(h % 2 == 0 and w % 2 == 0 for h, w in sides)
    rng = np.random.default_rng(8)
    for h, w in [(14, 18), (10, 24), (8, 32)]:
        x = rng.standard_normal((1, cfg.in_channels, h, w)).astype(np.float32)
        out = run(graph, x, t, context, y)
        assert out.shape == x.shape and np.isfinite(out).all()
        np.testing.assert_allclose(out, run(net, x, t, context, y), rtol=1e-4, atol=1e-4)
    assert tiny_config().model_copy(update={"structure_unet": cfg}).latent_factor == 8  # VAE 4 x patch 2


def test_gelu_exact_matches_the_erf_definition():
    x = np.linspace(-8, 8, 4001).astype(np.float32)
    expected = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    got = layers.gelu_exact(ms.Tensor(x)).asnumpy()
    assert np.abs(got - expected).max() < 1e-6
    half = layers.gelu_exact(ms.Tensor(x.astype(np.float16)))
    assert half.dtype == ms.float16


@pytest.mark.parametrize("kernel,stride,padding,hw", [(3, 1, 1, (10, 12)), (3, 2, 1, (16, 16)), (3, 2, 0, (9, 13)),
                                                      (1, 1, 0, (8, 6))])
def test_im2col_convolution_equals_mindspores_own(monkeypatch, kernel, stride, padding, hw):
    """layers.Conv2d computes on CPU as im2col + matmul; MindSpore's kernel (PANGUDRAW_CONV=native) gives the same
    sums, forward and in the weight gradients, and both have the parameter names of nn.Conv2d."""
    from mindspore import nn

    convs = {}
    for mode in ("native", "im2col"):
        monkeypatch.setenv("PANGUDRAW_CONV", mode)
        convs[mode] = layers.Conv2d(6, 5, kernel, stride=stride, padding=padding)
        assert convs[mode].im2col == (mode == "im2col")
    monkeypatch.delenv("PANGUDRAW_CONV")
    assert layers.im2col_convolution() is (ms.get_context("device_target") == "CPU")
    randomize(convs["native"], 3)
    for name, p in convs["native"].parameters_and_names():
        dict(convs["im2col"].parameters_and_names())[name].set_data(p.value())
    assert sorted(n for n, _ in convs["im2col"].parameters_and_names()) == ["bias", "weight"]
    x = ms.Tensor(np.random.default_rng(0).standard_normal((3, 6, *hw), dtype=np.float32))
    outs = {m: ms.jit(c.construct)(x).asnumpy() for m, c in convs.items()}
    assert outs["native"].shape == outs["im2col"].shape
    np.testing.assert_allclose(outs["im2col"], outs["native"], rtol=1e-5, atol=1e-5)

    class Loss(nn.Cell):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def construct(self, x):
            return (self.net(x) ** 2).mean()

    grads = {m: ms.value_and_grad(Loss(c), None, c.trainable_params())(x)[1] for m, c in convs.items()}
    for a, b in zip(grads["native"], grads["im2col"]):
        np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=1e-4, atol=1e-5)
    monkeypatch.setenv("PANGUDRAW_CONV", "fast")
    with pytest.raises(ValueError, match="PANGUDRAW_CONV must be auto, native or im2col"):
        layers.im2col_convolution()
