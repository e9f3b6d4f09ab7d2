"""The schedule, the structure/texture split, the samplers, guidance and buckets: pure math, no networks."""
import numpy as np
import pytest

from diffusion import buckets, guidance, noise, samplers
from diffusion.schedule import Schedule, sampling_timesteps, split_index


def test_sigma_max_matches_reference():
    assert Schedule().sigma_max == pytest.approx(14.6146, abs=1e-4)


def test_forty_step_timesteps_are_trailing():
    ts = sampling_timesteps(40)
    assert len(ts) == 40 and ts[0] == 999 and ts[-1] == 24
    assert np.all(np.diff(ts) < 0)
    assert 524 in ts and 499 in ts and 474 in ts
    np.testing.assert_array_equal(ts, np.linspace(999, 0, 40, endpoint=False).astype(int))


@pytest.mark.parametrize("steps,structure,texture", [(40, 21, 19), (50, 26, 24), (30, 16, 14), (20, 11, 9)])
def test_reference_split(steps, structure, texture):
    ts = sampling_timesteps(steps)
    k = split_index(ts, 500, "reference")
    assert (k, steps - k) == (structure, texture)
    # The lag: the last structure step is the first one below T_s.
    assert ts[k - 1] < 500 <= ts[k - 2]


@pytest.mark.parametrize("steps", [1, 2, 7, 20, 40, 50, 1000])
def test_exact_split(steps):
    ts = sampling_timesteps(steps)
    k = split_index(ts, 500, "exact")
    assert np.all(ts[:k] >= 500) and np.all(ts[k:] < 500)


def _gaussian_denoiser(c: float, sigmas):
    """Ideal x0 prediction when the data is N(0, c^2): E[x0 | x] = x c^2 / (c^2 + sigma^2)."""
    return lambda x, i: (x * (c * c / (c * c + sigmas[i] ** 2))).astype(np.float32)


@pytest.fixture
def setup():
    sched = Schedule()
    ts = sched.timesteps(20)
    sigmas = sched.sampling_sigmas(ts)
    x = noise.initial_noise([1, 2], (4, 8, 8)) * np.float32(np.sqrt(sigmas[0] ** 2 + 1))
    return sigmas, x


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_split_calls_equal_one_call(setup, name):
    sigmas, x = setup
    den = _gaussian_denoiser(0.5, sigmas)
    sampler = samplers.get_sampler(name)
    step_noise = noise.StepNoise([1, 2], (4, 8, 8))
    whole = sampler(den, x, sigmas, range(20), {}, step_noise)
    state: dict = {}
    half = sampler(den, x, sigmas, range(0, 11), state, step_noise)
    rest = sampler(den, half, sigmas, range(11, 20), state, step_noise)
    np.testing.assert_array_equal(whole, rest)


def test_ddim_eta0_equals_euler(setup):
    sigmas, x = setup
    den = _gaussian_denoiser(0.5, sigmas)
    a = samplers.euler(den, x, sigmas, range(20), {}, None)
    b = samplers.ddim(den, x, sigmas, range(20), {}, None)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_point_mass_data_is_recovered_by_every_sampler(setup):
    sigmas, x = setup
    target = np.full_like(x, 0.3)
    for name, sampler in samplers.SAMPLERS.items():
        out = sampler(lambda x_, i: target, x, sigmas, range(20), {}, noise.StepNoise([1, 2], (4, 8, 8)))
        np.testing.assert_allclose(out, target, atol=1e-5, err_msg=name)


def test_dpmpp_2m_is_closer_to_the_exact_ode_than_euler():
    # For Gaussian data the probability-flow ODE has the closed form x(s) = x(s_max) sqrt(c^2+s^2)/sqrt(c^2+s_max^2),
    # so the clean end point is x_T * c / sqrt(c^2 + s_max^2).
    sched = Schedule()
    c = 0.5
    for steps in (40, 80):
        sigmas = sched.sampling_sigmas(sched.timesteps(steps))
        x = noise.initial_noise([3], (4, 8, 8)) * np.float32(sigmas[0])
        exact = x * c / np.sqrt(c * c + sigmas[0] ** 2)
        den = _gaussian_denoiser(c, sigmas)
        err_euler = np.abs(samplers.euler(den, x, sigmas, range(steps), {}, None) - exact).max()
        err_dpm = np.abs(samplers.dpmpp_2m(den, x, sigmas, range(steps), {}, None) - exact).max()
        assert err_dpm < 0.6 * err_euler


def test_ancestral_noise_depends_on_seed_not_batch():
    a = noise.StepNoise([7, 8], (4, 4, 4))(3)
    b = noise.StepNoise([8], (4, 4, 4))(3)
    np.testing.assert_array_equal(a[1], b[0])
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(noise.StepNoise([7], (4, 4, 4))(3), noise.StepNoise([7], (4, 4, 4))(4))


def test_initial_noise_is_pcg64_of_the_seed():
    expected = np.random.Generator(np.random.PCG64(42)).standard_normal((4, 2, 2), dtype=np.float32)
    np.testing.assert_array_equal(noise.initial_noise([42], (4, 2, 2))[0], expected)


def test_guidance_combination_formula():
    rng = np.random.default_rng(0)
    d_u, d_c, d_a, d_p = (rng.standard_normal((4, 3, 3)) for _ in range(4))
    branches = guidance.active_branches({"aesthetic": 4.0, "anime": 0.0, "photography": 2.0})
    assert branches == ("uncond", "cond", "aesthetic", "photography")
    out = guidance.combine(np.stack([d_u, d_c, d_a, d_p]), branches, 6.0, {"aesthetic": 4.0, "photography": 2.0})
    expected = d_u + 6.0 * (d_c - d_u) + 4.0 * (d_a - d_c) + 2.0 * (d_p - d_c)
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_style_branch_prompts():
    assert guidance.branch_prompt("uncond", "a cat", "blurry") == "blurry"
    assert guidance.branch_prompt("cond", "a cat", "blurry") == "a cat"
    assert guidance.branch_prompt("aesthetic", "a cat", "") == "義 a cat"
    assert guidance.branch_prompt("anime", "a cat", "") == "饅 a cat"
    assert guidance.branch_prompt("photography", "a cat", "") == "霙 a cat"


def test_buckets_both_scales_and_snapping():
    assert len(buckets.BASE_BUCKETS) == 11
    assert buckets.choose_size((1.0, 2.0)).bucket == 5
    exact = buckets.choose_size((1.0, 2.0), 1280, 768)
    assert (exact.width, exact.height, exact.bucket, exact.scale, exact.snapped) == (1280, 768, 7, 2.0, False)
    assert buckets.choose_size((1.0, 2.0), 1024, 1024).bucket == 5
    snapped = buckets.choose_size((1.0, 2.0), 1920, 1080)
    assert snapped.snapped and (snapped.width, snapped.height) == (1280, 768) and snapped.bucket == 7
    assert (snapped.requested_width, snapped.requested_height) == (1920, 1080)
    tall = buckets.choose_size((1.0,), aspect="1:4")
    assert (tall.width, tall.height, tall.bucket, tall.snapped) == (256, 1024, 0, False)
    for scale in (1.0, 2.0):
        for i, (w, h) in enumerate(buckets.bucket_sizes(scale)):
            assert buckets.choose_size((1.0, 2.0), w, h).bucket == i
    with pytest.raises(ValueError, match="positive"):
        buckets.choose_size((1.0,), 0, 512)
    with pytest.raises(ValueError, match="W:H"):
        buckets.choose_size((1.0,), aspect="wide")


def test_bucket_embedding_is_cos_then_sin():
    emb = buckets.bucket_embedding(5, 256)
    k = np.arange(128)
    freqs = np.exp(-np.log(10000.0) * k / 128)
    np.testing.assert_allclose(emb[:128], np.cos(5 * freqs), rtol=1e-5)
    np.testing.assert_allclose(emb[128:], np.sin(5 * freqs), rtol=1e-5, atol=1e-6)
