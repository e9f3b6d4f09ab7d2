"""The PanGuDraw model object on a tiny random model: stages, determinism, batching, guidance, model directories."""
import json
import shutil

import numpy as np
import pytest

from diffusion import runtime
from diffusion.config import tiny_config
from diffusion.model import GenerationRequest, PanGuDraw
from diffusion.schedule import sampling_timesteps, split_index
from diffusion.tiny import build_random_model
from schemas.errors import UserError

runtime.configure("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("model") / "tiny", seed=3)


@pytest.fixture(scope="module")
def model(model_dir):
    return PanGuDraw.load(model_dir)


def req(prompt="a red circle on a blue background", seed=1, **kw):
    kw.setdefault("steps", 8)
    return GenerationRequest(prompt=prompt, seed=seed, **kw)


def test_generate_shape_and_seed_determinism(model):
    a, b, c = model.generate([req(seed=1), req(seed=1), req(seed=2)])
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_two_calls_equal_one_call(model):
    for sampler in ("euler", "dpmpp_2m", "euler_ancestral"):
        rows = [req(seed=5, sampler=sampler, steps=10), req("蓝色背景上的红色圆形", seed=6, sampler=sampler, steps=10)]
        conds = model.encode(rows)
        handoffs = model.sample_structure(rows, conds)
        assert all(h.step == split_index(sampling_timesteps(10), 500) for h in handoffs)
        two = model.decode(model.sample_texture(rows, conds, handoffs))
        one = model.decode(model.sample(rows, conds))
        np.testing.assert_array_equal(two, one, err_msg=sampler)


def test_batch_equals_rows_one_by_one(model):
    rows = [req(seed=s, prompt=p, aesthetic_scale=a) for s, p, a in
            [(1, "a red circle", 4.0), (2, "一只猫 a cat", 0.0), (3, "a purple checked star", 2.0)]]
    batch = model.generate(rows)
    for row, img in zip(rows, batch):
        np.testing.assert_array_equal(model.generate([row])[0], img)


def _recording(model):
    seen = {"structure_unet": [], "texture_unet": []}
    originals = {}
    for name in seen:
        fwd = model._fwd(name)
        originals[name] = fwd

        def wrapped(x, t, ctx, y, _fwd=fwd, _name=name):
            assert len(set(t.tolist())) == 1
            seen[_name].append(int(t[0]))
            return _fwd(x, t, ctx, y)

        model._forward[name] = wrapped
    return seen, originals


@pytest.mark.parametrize("rule", ["reference", "exact"])
@pytest.mark.parametrize("steps", [20, 40])
def test_each_timestep_runs_once_on_the_right_unet(model, rule, steps):
    model.split_rule = type(model.split_rule)(rule)
    seen, originals = _recording(model)
    try:
        model.generate([req(steps=steps)])
    finally:
        model._forward.update(originals)
        model.split_rule = type(model.split_rule)("reference")
    ts = sampling_timesteps(steps).tolist()
    k = split_index(np.array(ts), 500, rule)
    assert seen["structure_unet"] == ts[:k]
    assert seen["texture_unet"] == ts[k:]
    assert sorted(seen["structure_unet"] + seen["texture_unet"], reverse=True) == ts
    if rule == "exact":
        assert min(seen["structure_unet"]) >= 500 > max(seen["texture_unet"])
    else:
        assert (len(seen["structure_unet"]), len(seen["texture_unet"])) == {20: (11, 9), 40: (21, 19)}[steps]


def test_guidance_combination_on_a_model_with_known_outputs(model):
    # Each branch's eps is a constant read from its label input, so the combined eps is known exactly.
    branch_value = {}

    def fake_unet(x, t, ctx, y):
        return np.broadcast_to(y[:, :1, None, None], x.shape).astype(np.float32)

    rows = [req(steps=1, guidance_scale=5.0, aesthetic_scale=3.0, photography_scale=1.5)]
    cond = model.encode(rows)[0]
    for name, yv in zip(cond.branches, cond.y):
        branch_value[name] = float(yv[0])
    saved = dict(model._forward)
    model._forward["structure_unet"] = model._forward["texture_unet"] = fake_unet
    try:
        (handoff,) = model.sample_structure(rows, [cond])
    finally:
        model._forward.clear()
        model._forward.update(saved)
    d = branch_value
    expected_eps = d["uncond"] + 5.0 * (d["cond"] - d["uncond"]) + 3.0 * (d["aesthetic"] - d["cond"]) + 1.5 * (
        d["photography"] - d["cond"])
    x_t = model.initial_latents(rows)[0]
    # One Euler step from sigma_max to 0: x_0 = x_T - sigma_max * eps.
    np.testing.assert_allclose(handoff.latent, x_t - model.schedule.sigma_max * expected_eps, rtol=1e-5, atol=1e-4)
    assert cond.branches == ("uncond", "cond", "aesthetic", "photography")


def test_conditioning_layout(model):
    (c,) = model.encode([req(width=32, height=128)])
    cfg = model.config
    assert c.context.shape == (3, 77, cfg.text_encoder_1.width + cfg.text_encoder_2.width)
    assert c.y.shape == (3, cfg.structure_unet.adm_in_channels)
    from diffusion.buckets import bucket_embedding
    np.testing.assert_allclose(c.y[0, -cfg.bucket_embed_dim:], bucket_embedding(0, cfg.bucket_embed_dim))
    # The unconditional branch encodes the negative prompt, not a zero tensor.
    assert np.abs(c.context[0]).sum() > 0


def test_aspect_buckets_and_snapping(model):
    plan = model.plan(req(width=32, height=128))
    assert (plan.size.width, plan.size.height, plan.size.bucket, plan.size.snapped) == (32, 128, 0, False)
    snapped = model.plan(req(width=100, height=60))
    assert snapped.size.snapped and snapped.size.bucket == 7 and (snapped.size.width, snapped.size.height) == (80, 48)
    img = model.generate([req(width=128, height=32, steps=2)])[0]
    assert img.shape == (32, 128, 3)


def test_model_directory_round_trip_and_errors(model, model_dir, tmp_path):
    saved = model.save(tmp_path / "copy")
    again = PanGuDraw.load(saved)
    r = [req(steps=4)]
    np.testing.assert_array_equal(again.generate(r)[0], model.generate(r)[0])
    manifest = json.loads((saved / "model.json").read_text())
    assert manifest["format"] == "pangudraw-model" and manifest["trained"] is False

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "vae.safetensors").unlink()
    with pytest.raises(UserError, match="vae.safetensors"):
        PanGuDraw.load(broken)
    with pytest.raises(UserError, match="model.json"):
        PanGuDraw.load(tmp_path)

    wrong = tmp_path / "wrong"
    shutil.copytree(model_dir, wrong)
    other = build_random_model(tmp_path / "other", config=tiny_config(model_channels=16), seed=0)
    shutil.copy(other / "texture_unet.safetensors", wrong / "texture_unet.safetensors")
    with pytest.raises(UserError, match=r"texture_unet\.safetensors.*(input_blocks|time_embed|label_emb|out)"):
        PanGuDraw.load(wrong)


def test_partial_load_for_pipeline_stages(model_dir, model):
    text = PanGuDraw.load(model_dir, components={"text"})
    structure = PanGuDraw.load(model_dir, components={"structure"})
    texture = PanGuDraw.load(model_dir, components={"texture", "vae"})
    assert set(structure.nets) == {"structure_unet"}
    rows = [req(seed=9)]
    conds = text.encode(rows)
    img = texture.decode(texture.sample_texture(rows, conds, structure.sample_structure(rows, conds)))
    np.testing.assert_array_equal(img[0], model.generate(rows)[0])
    with pytest.raises(RuntimeError, match="without"):
        structure.decode(np.zeros((1, 4, 16, 16), np.float32))


def test_released_checkpoint_layout_loads_to_the_same_model(model, model_dir, tmp_path):
    """A tiny model written as the two released .ckpt files (sgm names, gamma/beta) loads and draws the same image."""
    from diffusion import checkpoints

    texture_ckpt, structure_ckpt = tmp_path / "pangu_low_timestamp.ckpt", tmp_path / "pangu_high_timestamp.ckpt"
    nets = model.nets
    checkpoints.write_released(texture_ckpt, {
        "unet": checkpoints.state_dict(nets["texture_unet"]),
        "vae": checkpoints.state_dict(nets["vae"]),
        "text_encoder_1": checkpoints.state_dict(nets["text_encoder_1"]),
        "text_encoder_2": checkpoints.state_dict(nets["text_encoder_2"]),
    })
    # The structure file also carries (unused) encoder and VAE copies in the release; give it different ones.
    other = PanGuDraw.random(model.config, model.tokenizers, seed=11)
    checkpoints.write_released(structure_ckpt, {
        "unet": checkpoints.state_dict(nets["structure_unet"]),
        "vae": checkpoints.state_dict(other.nets["vae"]),
    })
    names = set(checkpoints.read_ckpt(texture_ckpt))
    assert any(n.startswith("model.diffusion_model.input_blocks.") for n in names)
    assert any(n.startswith("conditioner.embedders.0.transformer.text_model.") for n in names)
    assert any(n.startswith("conditioner.embedders.1.model.") for n in names)
    assert any(n.startswith("first_stage_model.") and n.endswith(".gamma") for n in names)
    loaded = PanGuDraw.from_released(texture_ckpt, structure_ckpt,
                                     {"text_encoder_1": model_dir / "tokenizer_1", "text_encoder_2": model_dir / "tokenizer_2"},
                                     config=model.config)
    rows = [req(seed=4, steps=6)]
    np.testing.assert_array_equal(loaded.generate(rows)[0], model.generate(rows)[0])
