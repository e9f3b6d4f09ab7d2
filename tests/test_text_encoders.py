"""Both text encoders: released names and shapes at full size (lazily built), and tiny-config behaviour on CPU."""
from __future__ import annotations

import os
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore.nn.utils import no_init_parameters

from diffusion.config import PANGU_DRAW_V3, TextEncoderConfig, tiny_config
from diffusion.nets.text_encoders import CLIPTextEncoder, OpenCLIPTextEncoder, build_text_encoder

REFERENCE_KEYS = Path(os.environ.get(
    "PANGUDRAW_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"
)) / "sdxl_base_mindspore_keys.txt"
# In the released MindSpore key list this line holds encoder 1's token table under a garbled encoder-2 name.
GARBLED_LINE = 1681


def reference_lines() -> list[tuple[int, str, tuple[int, ...]]]:
    if not REFERENCE_KEYS.is_file():
        pytest.skip(f"reference key list not found at {REFERENCE_KEYS} (set PANGUDRAW_REFERENCE_DIR)")
    out = []
    for number, line in enumerate(REFERENCE_KEYS.read_text().splitlines(), 1):
        name, _, shape = line.partition(":")
        dims = shape.strip("()").replace(" ", "")
        out.append((number, name, tuple(int(d) for d in dims.split(",") if d)))
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc to read resident memory")
def test_full_size_names_and_shapes_match_release_without_allocating():
    lines = reference_lines()
    number, garbled, shape = next(item for item in lines if item[0] == GARBLED_LINE)
    assert garbled == "conditioner.embedders.1.model.token_embedding..embedding_table" and shape == (49408, 768)
    expected = {0: {}, 1: {}}
    for number, name, shape in lines:
        for which in (0, 1):
            prefix = f"conditioner.embedders.{which}."
            if name.startswith(prefix) and number != GARBLED_LINE:
                expected[which][name[len(prefix):]] = shape
    # The garbled line is encoder 1's CLIP token table; PanGu-Draw's has the Chinese vocabulary's 21128 rows.
    expected[0]["transformer.text_model.embeddings.token_embedding.embedding_table"] = (21128, 768)
    assert (len(expected[0]), len(expected[1])) == (196, 390)

    before = rss_bytes()
    with no_init_parameters():
        encoders = {0: build_text_encoder(PANGU_DRAW_V3.text_encoder_1),
                    1: build_text_encoder(PANGU_DRAW_V3.text_encoder_2)}
    grown = rss_bytes() - before
    assert isinstance(encoders[0], CLIPTextEncoder) and isinstance(encoders[1], OpenCLIPTextEncoder)
    total = 0
    for which, enc in encoders.items():
        params = list(enc.get_parameters())
        ours = {p.name: tuple(p.shape) for p in params}
        assert ours == expected[which]
        assert [n for n, _ in enc.parameters_and_names()] == [p.name for p in params]
        assert all(p.has_init for p in params)
        total += sum(int(np.prod(s)) for s in ours.values())
    # 796M float32 weights (3.2 GB) would be allocated by an eager build; none is materialised here.
    assert total == 796_001_281
    assert grown < 64 * 2**20, f"building the lazy encoders grew resident memory by {grown / 2**20:.0f} MiB"


# ---------------------------------------------------------------- tiny encoders

TINY = tiny_config()
EOT_ID = TINY.text_encoder_2.vocab_size - 1


def _randomise_norms(net: ms.nn.Cell, seed: int) -> None:
    """Non-trivial gamma/beta, so a test can tell a normalised output from an unnormalised one."""
    rng = np.random.default_rng(seed)
    for p in net.get_parameters():
        if p.name.endswith(("gamma", "beta")):
            base = 1.0 if p.name.endswith("gamma") else 0.0
            p.set_data(ms.Tensor((base + 0.3 * rng.standard_normal(p.shape)).astype(np.float32)))


def _copy_weights(src: ms.nn.Cell, dst: ms.nn.Cell) -> None:
    """Copy every parameter of `dst` from the same name in `src` (dst may have fewer layers)."""
    values = {p.name: p.asnumpy() for p in src.get_parameters()}
    for p in dst.get_parameters():
        p.set_data(ms.Tensor(values[p.name]))


def _encoder(cfg: TextEncoderConfig, seed: int = 0, dtype=ms.float32):
    ms.set_seed(seed)
    net = build_text_encoder(cfg, dtype)
    _randomise_norms(net, seed)
    return net


def _ids(rows: list[list[int]]) -> ms.Tensor:
    out = np.zeros((len(rows), 77), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return ms.Tensor(out)


def _layer_norm(x, gamma, beta, eps=1e-5):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * gamma + beta


@pytest.fixture(scope="module")
def enc1():
    return _encoder(TINY.text_encoder_1, seed=1)


@pytest.fixture(scope="module")
def enc2():
    return _encoder(TINY.text_encoder_2, seed=2)


IDS = _ids([[3, 17, 42, 99, 8, EOT_ID], [3, 5, EOT_ID], [3, 200, 201, 202, 203, 204, 205, 206, EOT_ID]])


def test_output_shapes(enc1, enc2):
    hidden1 = enc1(IDS)
    hidden2, pooled = enc2(IDS)
    assert hidden1.shape == (3, 77, TINY.text_encoder_1.width) and hidden1.dtype == ms.float32
    assert hidden2.shape == (3, 77, TINY.text_encoder_2.width) and hidden2.dtype == ms.float32
    assert pooled.shape == (3, TINY.text_encoder_2.projection_dim) and pooled.dtype == ms.float32


@pytest.mark.parametrize("which", [1, 2])
def test_causal_mask(enc1, enc2, which):
    net = enc1 if which == 1 else enc2
    a = _ids([[3, 17, 42, 99, 8, 60, 61, EOT_ID]])
    b = _ids([[3, 17, 42, 99, 8, 77, 61, EOT_ID]])  # differs at position 5 only
    out_a, out_b = net(a), net(b)
    if which == 2:
        out_a, out_b = out_a[0], out_b[0]
    out_a, out_b = out_a.asnumpy()[0], out_b.asnumpy()[0]
    np.testing.assert_allclose(out_a[:5], out_b[:5], atol=1e-6)
    assert np.abs(out_a[5:] - out_b[5:]).max(axis=-1).min() > 1e-4  # every later position changes


def test_pooled_is_final_norm_of_last_layer_at_eot_times_projection(enc2):
    last_cfg = TINY.text_encoder_2.model_copy(update={"output_layer": "last"})
    last_net = build_text_encoder(last_cfg)
    _copy_weights(enc2, last_net)
    last, pooled_from_last = last_net(IDS)
    _, pooled = enc2(IDS)
    np.testing.assert_allclose(pooled_from_last.asnumpy(), pooled.asnumpy(), atol=1e-6)
    m = enc2.model
    final = _layer_norm(last.asnumpy(), m.ln_final.gamma.asnumpy(), m.ln_final.beta.asnumpy())
    eot = IDS.asnumpy().argmax(axis=1)
    assert eot.tolist() == [5, 2, 8]
    expected = final[np.arange(3), eot] @ m.text_projection.asnumpy()
    np.testing.assert_allclose(pooled.asnumpy(), expected, atol=1e-4)
    # Tokens after the EOT (padding) cannot change the pooled vector.
    padded = IDS.asnumpy().copy()
    padded[:, 60:] = 7
    np.testing.assert_allclose(enc2(ms.Tensor(padded))[1].asnumpy(), pooled.asnumpy(), atol=1e-5)


def test_encoder2_returns_penultimate_layer_without_final_norm(enc2):
    # A one-layer copy's last layer (no final norm) is the two-layer model's penultimate output.
    one_cfg = TINY.text_encoder_2.model_copy(update={"layers": 1, "output_layer": "last"})
    one = build_text_encoder(one_cfg)
    _copy_weights(enc2, one)
    penultimate, _ = enc2(IDS)
    np.testing.assert_allclose(penultimate.asnumpy(), one(IDS)[0].asnumpy(), atol=1e-5)
    last_cfg = TINY.text_encoder_2.model_copy(update={"output_layer": "last"})
    last_net = build_text_encoder(last_cfg)
    _copy_weights(enc2, last_net)
    assert np.abs(last_net(IDS)[0].asnumpy() - penultimate.asnumpy()).max() > 1e-2


def test_encoder1_returns_last_layer_after_final_norm():
    # A three-layer model's penultimate output is the state after two layers; a two-layer copy with
    # output_layer="last" must return exactly final_layer_norm of that state.
    three_cfg = TINY.text_encoder_1.model_copy(update={"layers": 3, "output_layer": "penultimate"})
    three = _encoder(three_cfg, seed=5)
    enc1_two = build_text_encoder(TINY.text_encoder_1)
    _copy_weights(three, enc1_two)
    before_norm = three(IDS).asnumpy()
    fln = enc1_two.transformer.text_model.final_layer_norm
    expected = _layer_norm(before_norm, fln.gamma.asnumpy(), fln.beta.asnumpy())
    np.testing.assert_allclose(enc1_two(IDS).asnumpy(), expected, atol=1e-4)
    assert np.abs(expected - before_norm).max() > 1e-2


def test_jit_equals_eager(enc1, enc2):
    np.testing.assert_allclose(ms.jit(enc1.construct)(IDS).asnumpy(), enc1(IDS).asnumpy(), atol=1e-5)
    hidden, pooled = enc2(IDS)
    jit_hidden, jit_pooled = ms.jit(enc2.construct)(IDS)
    np.testing.assert_allclose(jit_hidden.asnumpy(), hidden.asnumpy(), atol=1e-5)
    np.testing.assert_allclose(jit_pooled.asnumpy(), pooled.asnumpy(), atol=1e-5)


def test_batch_equals_rows_one_by_one(enc2):
    hidden, pooled = enc2(IDS)
    for i in range(3):
        h, p = enc2(IDS[i:i + 1])
        np.testing.assert_allclose(h.asnumpy()[0], hidden.asnumpy()[i], atol=1e-5)
        np.testing.assert_allclose(p.asnumpy()[0], pooled.asnumpy()[i], atol=1e-5)


def test_float16_close_to_float32():
    for cfg in (TINY.text_encoder_1, TINY.text_encoder_2):
        full, half = _encoder(cfg, seed=7), _encoder(cfg, seed=7, dtype=ms.float16)
        assert next(iter(half.get_parameters())).dtype == ms.float16
        out_full, out_half = full(IDS), half(IDS)
        if isinstance(out_full, tuple):
            out_full, out_half = out_full[0], out_half[0]
        assert out_half.dtype == ms.float32
        np.testing.assert_allclose(out_half.asnumpy(), out_full.asnumpy(), atol=0.05)


def test_layout_checks():
    with pytest.raises(ValueError, match="projection_dim"):
        OpenCLIPTextEncoder(TINY.text_encoder_2.model_copy(update={"projection_dim": 0}))
    with pytest.raises(ValueError, match="hf_clip"):
        CLIPTextEncoder(TINY.text_encoder_2)
    with pytest.raises(ValueError, match="divisible"):
        build_text_encoder(TINY.text_encoder_1.model_copy(update={"heads": 3}))
