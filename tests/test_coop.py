"""Coop-Diffusion on tiny random models: identity and weight-0 fusion, windows, bridges, super-resolution, multi-control."""
import numpy as np
import pytest
from PIL import Image

from diffusion import coop, runtime
from diffusion.config import tiny_lowres_config, tiny_sd15_config
from diffusion.model import GenerationRequest, PanGuDraw
from diffusion.tiny import build_random_model

runtime.configure("cpu")

STEPS = 6  # timesteps 999 832 666 499 333 166: three at t >= 500; the reference split is at step 4


@pytest.fixture(scope="module")
def primary(tiny_model_dir):
    return PanGuDraw.load(tiny_model_dir)


@pytest.fixture(scope="module")
def primary_copy(tiny_model_dir):
    """The primary's weights and VAE, loaded a second time: another model object."""
    return PanGuDraw.load(tiny_model_dir)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """Another latent space: f=8 VAE (8x8 latents at 64x64), latent scale 0.18215, its own weights."""
    return PanGuDraw.load(build_random_model(tmp_path_factory.mktemp("sd15") / "m", config=tiny_sd15_config(), seed=1))


@pytest.fixture(scope="module")
def lowres(tmp_path_factory):
    """The low-resolution partner: 32x32 images, 8x8 latents."""
    return PanGuDraw.load(build_random_model(tmp_path_factory.mktemp("low") / "m", config=tiny_lowres_config(), seed=2))


def rows(*seeds, prompt="a red circle on a blue background", **kw):
    kw.setdefault("steps", STEPS)
    kw.setdefault("aesthetic_scale", 0.0)
    return [GenerationRequest(prompt=prompt, seed=s, **kw) for s in seeds]


def control_image(kind: str = "disc") -> np.ndarray:
    yy, xx = np.mgrid[:32, :32]
    img = np.zeros((32, 32, 3), np.uint8)
    if kind == "disc":
        img[(yy - 16) ** 2 + (xx - 16) ** 2 < 100] = (255, 40, 40)
    else:
        img[4:12, :] = (40, 40, 255)
    return img


# ------------------------------------------------------------ identity, weight 0, windows

@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m", "euler_ancestral"])
def test_identical_helper_gives_the_primary_image(primary, primary_copy, sampler):
    batch = rows(11, 12, sampler=sampler, prompt="a green striped square on a white background")
    conds = primary.encode(batch)
    plain = primary.sample(batch, conds)
    for weight in (0.3, 1.0):
        fusion = coop.CoopFusion(primary, batch, [coop.CoopHelper(primary_copy, weight=weight)])
        fused = fusion.sample(conds)
        np.testing.assert_array_equal(fused, plain, err_msg=f"{sampler} weight {weight}")
        (rec,) = fusion.record()
        assert rec["bridge"] == "identity" and rec["steps"] == list(range(STEPS))
    np.testing.assert_array_equal(primary.decode(fused), primary.decode(plain))


def test_two_identical_helpers_give_the_primary_image(primary, primary_copy):
    batch = rows(13)
    conds = primary.encode(batch)
    helpers = [coop.CoopHelper(primary_copy, weight=0.3), coop.CoopHelper(primary, weight=0.5)]
    np.testing.assert_array_equal(coop.coop_sample(primary, batch, conds, helpers), primary.sample(batch, conds))


def test_weight_zero_changes_nothing(primary, sd15, lowres):
    batch = rows(21, 22)
    conds = primary.encode(batch)
    fusion = coop.CoopFusion(primary, batch, [coop.CoopHelper(sd15, weight=0.0), coop.CoopHelper(lowres, weight=0.0)])
    np.testing.assert_array_equal(fusion.sample(conds), primary.sample(batch, conds))
    assert fusion.calls == [[], []]


def test_window_switches_fusion_on_and_off_at_its_steps(primary, sd15):
    steps = 8
    batch = rows(31, steps=steps)
    conds = primary.encode(batch)
    fusion = coop.CoopFusion(primary, batch, [coop.CoopHelper(sd15, weight=0.5, window=(0.25, 0.75))])
    changed, chain_steps = {}, {}

    def traced(x, i, denoised):
        out = fusion(x, i, denoised)
        changed[i] = not np.array_equal(out, denoised)
        chain_steps[i] = int(fusion.state["coop0_step"][0]) if "coop0_step" in fusion.state else None
        return out

    x = primary.initial_latents(batch)
    out = primary.run_steps(batch, conds, x, range(steps), fusion.state, fuse=traced)
    assert fusion.calls == [[2, 3, 4, 5]]  # start <= i / 8 < end
    assert [i for i in range(steps) if changed[i]] == [2, 3, 4, 5]
    # The helper's chain exists while the window lasts, one step ahead, and is dropped at its end.
    assert chain_steps == {0: None, 1: None, 2: 3, 3: 4, 4: 5, 5: None, 6: None, 7: None}
    # Before the window the primary runs alone: its latents at step 2 are the plain ones.
    before = fusion.run(conds, None, 2)
    np.testing.assert_array_equal(np.stack([h.latent for h in before]),
                                  primary.run_steps(batch, conds, x, range(2), {}))
    assert not np.array_equal(out, primary.sample(batch, conds))


def test_helper_settings_are_checked(primary, sd15):
    with pytest.raises(ValueError, match="weight"):
        coop.CoopHelper(sd15, weight=1.5)
    with pytest.raises(ValueError, match="window"):
        coop.CoopHelper(sd15, window=(0.5, 0.5))
    with pytest.raises(ValueError, match="control image"):
        coop.CoopHelper(sd15, control_image=np.zeros((8, 8), np.uint8))
    helpers = [coop.CoopHelper(sd15, weight=0.6, window=(0.0, 0.6)), coop.CoopHelper(sd15, weight=0.6, window=(0.5, 1))]
    with pytest.raises(ValueError, match="step 3 sum to 1.2"):
        coop.CoopFusion(primary, rows(1), helpers)
    # Disjoint windows may each carry a large weight.
    helpers[1] = coop.CoopHelper(sd15, weight=0.6, window=(0.6, 1))
    assert [len(c) for c in coop.CoopFusion(primary, rows(1), helpers, helper_conds=[[], []]).calls] == [0, 0]


# ------------------------------------------------------------ bridges

class LinearSpace:
    """A stand-in latent space with known linear maps: decode = nearest-upsample(M z), encode = M^-1 box-mean(x)."""

    def __init__(self, key, scale, factor, mix):
        self.key, self.scale, self.factor, self.mix = key, scale, factor, np.asarray(mix, np.float32)

    def decode(self, z):
        x = np.einsum("pc,bchw->bphw", self.mix, z)
        return x.repeat(self.factor, axis=2).repeat(self.factor, axis=3)

    def encode(self, x):
        b, c, h, w = x.shape
        f = self.factor
        mean = x.reshape(b, c, h // f, f, w // f, f).mean(axis=(3, 5))
        return np.einsum("cp,bphw->bchw", np.linalg.inv(self.mix), mean)


MIX_A = [[1.0, 0.2, 0.0], [0.0, 1.0, 0.3], [0.1, 0.0, 1.0]]
MIX_B = [[0.5, 0.0, 0.0], [0.2, 0.5, 0.0], [0.0, 0.1, 0.4]]


def test_bridge_with_known_linear_spaces():
    space_a, space_b = LinearSpace("A", 0.13, 4, MIX_A), LinearSpace("B", 0.18, 2, MIX_B)
    rng = np.random.default_rng(0)
    z = rng.uniform(-0.1, 0.1, (2, 3, 8, 8)).astype(np.float32)  # decodes inside [-1, 1]
    # Equal pixel sizes (8 * 2 = 4 * 4 = 16): P_BA(z) = s_A / s_B * M_A^-1 M_B z, per latent cell of A (2x2 of B).
    bridged = coop.Bridge(space_b, space_a, (3, 8, 8), (3, 4, 4))(z)
    pooled = z.reshape(2, 3, 4, 2, 4, 2).mean(axis=(3, 5))
    expected = 0.13 / 0.18 * np.einsum("cp,pq,bqhw->bchw", np.linalg.inv(MIX_A), np.asarray(MIX_B), pooled)
    np.testing.assert_allclose(bridged, expected, rtol=1e-5, atol=1e-6)
    # Constant latents stay constant through any resize; out-of-range pixels are clipped to [-1, 1].
    const = np.broadcast_to(np.array([1.0, -0.2, 0.3], np.float32)[None, :, None, None], (1, 3, 4, 4))
    pixels = np.clip(np.asarray(MIX_B) @ (np.array([1.0, -0.2, 0.3]) / 0.18), -1, 1)
    assert pixels[0] == 1.0  # the first channel is clipped
    up = coop.Bridge(space_b, space_a, (3, 4, 4), (3, 8, 8))(const)  # 8 -> 32 pixels
    np.testing.assert_allclose(up, np.broadcast_to((0.13 * np.linalg.inv(MIX_A) @ pixels)[None, :, None, None],
                                                   (1, 3, 8, 8)), rtol=1e-5)
    unclipped = coop.Bridge(space_b, space_a, (3, 4, 4), (3, 8, 8), clip=False)(const)
    assert not np.allclose(unclipped, up)
    # Same key and shape: the identity, no decode at all.
    same = coop.Bridge(space_a, LinearSpace("A", 0.13, 4, MIX_A), (3, 8, 8), (3, 8, 8))
    assert same.identity and same(z) is z


@pytest.mark.parametrize("size_in,size_out", [(8, 16), (16, 32), (12, 20), (32, 8), (24, 8)])
def test_resize_matches_pillow(size_in, size_out):
    rng = np.random.default_rng(size_in)
    img = rng.uniform(-1, 1, (size_in, size_in)).astype(np.float32)
    ours = coop.resize_pixels(img[None, None], (size_out, size_out))[0, 0]
    filt = Image.BILINEAR if size_out > size_in else Image.BOX
    ref = np.asarray(Image.fromarray(img, mode="F").resize((size_out, size_out), filt))
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_area_resize_at_a_fractional_factor_averages_exact_overlaps():
    m = coop.resize_matrix(12, 8)  # each output pixel covers 1.5 input pixels
    np.testing.assert_allclose(m[0, :3], [2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(m[1, :3], [0, 1 / 3, 2 / 3])
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    np.testing.assert_allclose(m.sum(axis=0), 8 / 12)  # every input pixel counts equally: the mean is kept


def test_bridge_on_tiny_vaes_is_decode_resize_encode(primary, sd15, lowres):
    import mindspore as ms

    rng = np.random.default_rng(1)
    for helper, shape in ((sd15, (4, 8, 8)), (lowres, (4, 8, 8))):
        z = rng.standard_normal((1, *shape)).astype(np.float32)
        bridged = coop.bridge(helper, primary, shape, (4, 16, 16))(z)
        s_b, s_a = helper.config.vae.scale_factor, primary.config.vae.scale_factor
        pixels = np.clip(helper.nets["vae"].decode(ms.Tensor(z / s_b)).asnumpy(), -1, 1)
        if pixels.shape[-1] != 64:  # 32 -> 64 pixels, checked against Pillow's bilinear
            pixels = np.stack([[np.asarray(Image.fromarray(ch, mode="F").resize((64, 64), Image.BILINEAR))
                                for ch in img] for img in pixels])
        mean, _ = primary.nets["vae"].encode(ms.Tensor(pixels.astype(np.float32)))
        np.testing.assert_allclose(bridged, mean.asnumpy() * s_a, rtol=1e-4, atol=1e-4)
        assert bridged.shape == (1, 4, 16, 16)


def test_identity_bridge_needs_equal_vae_weights_and_shape(primary, primary_copy, sd15):
    assert coop.vae_key(primary) == coop.vae_key(primary_copy) != coop.vae_key(sd15)
    assert coop.bridge(primary, primary_copy, (4, 16, 16), (4, 16, 16)).identity
    assert not coop.bridge(primary, primary_copy, (4, 16, 16), (4, 14, 18)).identity
    assert not coop.bridge(sd15, primary, (4, 16, 16), (4, 16, 16)).identity


# ------------------------------------------------------------ one-stage super-resolution

def test_super_resolution_hands_over_at_t_switch(primary, primary_copy, lowres, monkeypatch):
    batch = rows(41, 42)
    sr = coop.plan_super_resolution(lowres, primary, batch, t_switch=500)
    assert (sr.handover_step, sr.handover_timestep) == (3, 499) and sr.steps == STEPS
    assert sr.handover_sigma == pytest.approx(float(primary.schedule.sigmas[499]))
    assert sr.low_shape == (4, 8, 8) and sr.high_shape == (4, 16, 16) and sr.output_size == (64, 64)
    assert [(r.width, r.height) for r in sr.high_requests] == [(64, 64)] * 2

    ran = []
    for model, name in ((lowres, "low"), (primary, "high")):
        real = model.run_steps
        monkeypatch.setattr(model, "run_steps", lambda *a, _real=real, _name=name, **k: ran.append((_name, list(a[3])))
                            or _real(*a, **k))
    x0_low = coop.low_stage(lowres, sr)
    x_high = coop.handover(lowres, primary, sr, x0_low)
    latents = coop.high_stage(primary, sr, x_high)
    assert ran == [("low", [0, 1, 2]), ("high", [3, 4, 5])]

    # x = Up(x0) + sigma_{t_k} * xi with the row's own fresh noise.
    x0_high = coop.bridge(lowres, primary, (4, 8, 8), (4, 16, 16))(x0_low)
    xi = (x_high - x0_high) / sr.handover_sigma
    np.testing.assert_allclose(xi, coop.handover_noise([41, 42], (4, 16, 16)), atol=2e-5)
    np.testing.assert_allclose(xi[1], coop.handover_noise([42], (4, 16, 16))[0], atol=2e-5)
    assert abs(xi.mean()) < 0.1 and abs(xi.std() - 1.0) < 0.1 and not np.allclose(xi[0], xi[1])
    monkeypatch.undo()
    np.testing.assert_array_equal(latents, coop.super_resolve(lowres, primary, batch, 500))
    # Helpers may join the high-resolution steps; one identical to the high model changes nothing.
    joined = coop.super_resolve(lowres, primary, batch, 500, helpers=[coop.CoopHelper(primary_copy, weight=0.5)])
    np.testing.assert_array_equal(joined, latents)
    assert primary.decode(latents).shape == (2, 64, 64, 3)
    assert lowres.decode(x0_low).shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="above every timestep"):
        coop.plan_super_resolution(lowres, primary, batch, t_switch=1000)


# ------------------------------------------------------------ multi-control and the split form

def test_multi_control_with_two_helpers(primary, sd15, lowres):
    batch = rows(51)
    conds = primary.encode(batch)
    helpers = [coop.CoopHelper(sd15, weight=0.3, window=(0.0, 0.5)),
               coop.CoopHelper(lowres, weight=0.4, window=(0.3, 1.0), control_image=control_image())]
    fusion = coop.CoopFusion(primary, batch, helpers)
    both = fusion.sample(conds)
    assert fusion.calls == [[0, 1, 2], [2, 3, 4, 5]]
    rec = fusion.record()
    assert [r["bridge"] for r in rec] == ["pixel", "pixel"] and [r["control"] for r in rec] == [False, True]
    assert rec[1]["helper_size"] == [32, 32]
    singles = [coop.coop_sample(primary, batch, conds, [h]) for h in helpers]
    plain = primary.sample(batch, conds)
    for other in (*singles, plain):
        assert np.abs(both - other).max() > 1e-3


def test_control_helper_alone_decides_the_image_at_weight_one(primary, lowres):
    """With w_A = 0 the last step's x0 is the control helper's, whatever the primary's prompt."""
    batch = rows(61, prompt="a red circle") + rows(61, prompt="a purple checked star")
    conds = primary.encode(batch)

    def run(kind):
        helper = coop.CoopHelper(lowres, weight=1.0, control_image=control_image(kind), prompt="a yellow triangle")
        return coop.coop_sample(primary, batch, conds, [helper])

    disc = run("disc")
    np.testing.assert_allclose(disc[0], disc[1], atol=1e-5)  # x0_A + 1 * (x0_B - x0_A) rounds near x0_B
    assert np.abs(disc - run("bar")).max() > 1e-3
    assert np.abs(disc[0] - primary.sample(batch[:1], conds[:1])[0]).max() > 1e-3


def test_split_stages_equal_one_call_with_the_helper_chain_in_the_handoff(primary, sd15):
    batch = rows(71, 72)
    conds = primary.encode(batch)
    helpers = [coop.CoopHelper(sd15, weight=0.5)]
    handoffs = coop.CoopFusion(primary, batch, helpers).structure(conds)
    assert handoffs[0].step == 4
    assert handoffs[0].state["coop0_latent"].shape == (4, 8, 8) and int(handoffs[0].state["coop0_step"]) == 4
    later = coop.CoopFusion(primary, batch, helpers)  # as in another process
    np.testing.assert_array_equal(later.texture(conds, handoffs), coop.CoopFusion(primary, batch, helpers).sample(conds))
    assert later.calls == [[4, 5]]
