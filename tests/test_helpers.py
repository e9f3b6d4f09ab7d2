"""The Coop-Diffusion helper models: their recipe's architectures, the shipped trained helpers, and the builtin
aliases that name them (with random stand-ins where a checkout ships none)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from actors import fusion
from diffusion.config import ModelConfig
from diffusion.model import PanGuDraw, default_model_dir, read_model_manifest
from diffusion.training.helpers import HELPER_NAMES, HelperRecipe, helper_config, shipped_helper_dir
from diffusion.training.recipe import shipped_tiny_config
from schemas.errors import UserError


def test_helper_architectures_follow_the_base_model():
    base = shipped_tiny_config()
    low = helper_config("tiny-lowres", base)
    assert low.bucket_scales == (0.0625,) and low.monolithic and low.vae == base.vae
    assert low.structure_unet == base.structure_unet and low.text_encoder_1 == base.text_encoder_1
    sd15 = helper_config("tiny-sd15", base)
    assert sd15.vae.ch_mult == (1, 2, 2, 2) and sd15.vae.norm_groups == 0 and sd15.monolithic
    assert sd15.bucket_scales == base.bucket_scales and sd15.text_encoder_2 == base.text_encoder_2
    # 64x64 images: 16x16 latents in the base and the low-resolution helper's latent space, 8x8 in tiny-sd15's.
    assert PanGuDraw(base).plan(_request(64, 64)).latent_shape == (4, 16, 16)
    assert PanGuDraw(sd15).plan(_request(64, 64)).latent_shape == (4, 8, 8)
    assert PanGuDraw(low).plan(_request(64, 64)).size.width == 32
    with pytest.raises(ValueError, match="unknown helper 'huge'"):
        helper_config("huge", base)
    with pytest.raises(ValueError, match="shipped helpers: tiny-lowres, tiny-sd15"):
        shipped_helper_dir("huge")
    recipe = HelperRecipe()
    assert recipe.unet.mode == "monolithic" and recipe.unet.train_text_encoders is False


def _request(w, h):
    from diffusion.model import GenerationRequest

    return GenerationRequest(prompt="x", seed=0, width=w, height=h, steps=4)


@pytest.mark.parametrize("name", HELPER_NAMES)
def test_shipped_helpers_are_trained_small_and_read_prompts_like_the_primary(name):
    root = shipped_helper_dir(name)
    if not (root / "model.json").is_file():
        pytest.skip(f"no trained {name} is shipped")
    manifest = read_model_manifest(root)
    primary = read_model_manifest(default_model_dir())
    assert manifest["trained"] is True and "pangudraw train helpers" in manifest["description"]
    def unscaled(cfg: ModelConfig) -> ModelConfig:  # the latent scale factor is fitted after the VAE's start
        return cfg.model_copy(update={"vae": cfg.vae.model_copy(update={"scale_factor": 1.0})})

    expected = helper_config(name, ModelConfig.model_validate(primary["config"]))
    assert unscaled(ModelConfig.model_validate(manifest["config"])) == unscaled(expected)
    # The text encoders were frozen: byte-identical weight files to the primary's.
    for enc in ("text_encoder_1.safetensors", "text_encoder_2.safetensors"):
        assert manifest["file_hashes"][enc] == primary["file_hashes"][enc]
    assert (manifest["file_hashes"]["vae.safetensors"] == primary["file_hashes"]["vae.safetensors"]) == \
        (name == "tiny-lowres")
    assert manifest["weights_dtype"] == primary["weights_dtype"] == "float16"
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 3 * 2**20, f"{name} is {size / 2**20:.1f} MB"
    assert fusion.builtin_model_dir(name) == root


def test_a_builtin_alias_without_shipped_weights_builds_a_random_stand_in(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(fusion, "_shipped_helper_dir", lambda name: tmp_path / "nothing" / name)
    monkeypatch.setenv("PANGUDRAW_CACHE", str(tmp_path / "cache"))
    with caplog.at_level("WARNING"):
        first = fusion.builtin_model_dir("tiny-lowres")
    assert first == tmp_path / "cache" / "random-tiny-lowres-v1"
    manifest = json.loads((first / "model.json").read_text())
    assert manifest["config"]["name"] == "tiny-lowres-random" and manifest["config"]["bucket_scales"] == [0.0625]
    assert "no trained tiny-lowres model is shipped" in caplog.text
    stamp = (first / "model.json").stat().st_mtime_ns
    assert fusion.builtin_model_dir("tiny-lowres") == first and (first / "model.json").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="unknown builtin model builtin:huge"):
        fusion.builtin_model_dir("huge")


# ---------------------------------------------------------------- what the trained helpers do (shipped weights)

@pytest.fixture(scope="module")
def trained():
    for name in HELPER_NAMES:
        if not (shipped_helper_dir(name) / "model.json").is_file():
            pytest.skip(f"no trained {name} is shipped")
    from diffusion import evaluation, runtime, synthetic

    runtime.configure("cpu")
    primary = PanGuDraw.load(default_model_dir(), batch_invariant=False)
    low = PanGuDraw.load(shipped_helper_dir("tiny-lowres"), batch_invariant=False)
    prompts = [p for p in synthetic.evaluation_prompts(24) if p.aspect_bucket == 5][:SR_PROMPTS]
    return primary, low, evaluation.Classifier.load(), prompts


SR_PROMPTS = 8
SR_KEPT_FLOOR, SR_MARGIN = 0.5, 0.15


def test_one_stage_super_resolution_keeps_the_low_resolution_layout(trained):
    """32x32 tiny-lowres for t >= 500, then the 64x64 primary: the result keeps the 32x32 image's layout (grey 8x8
    thumbnails correlate) far more than the primary's own image from the same seed does. Measured on these 8
    prompts: 0.72 against 0.39 (benchmarks/coop_quality.py on 24: 0.715 against 0.348)."""
    from diffusion import coop, evaluation
    from diffusion.model import GenerationRequest

    primary, low, clf, prompts = trained

    def req(p, side):
        return GenerationRequest(prompt=p.prompt, seed=p.seed, width=side, height=side, steps=20,
                                 guidance_scale=6.0, aesthetic_scale=4.0)

    low_imgs = low.generate([req(p, 32) for p in prompts])
    sr = primary.decode(coop.super_resolve(low, primary, [req(p, 32) for p in prompts], 500))
    plain = primary.generate([req(p, 64) for p in prompts])
    assert sr.shape == (SR_PROMPTS, 64, 64, 3) and low_imgs[0].shape == (32, 32, 3)
    up = evaluation.resize_images(low_imgs, (64, 64))
    kept = np.mean([evaluation.thumbnail_correlation(a, b) for a, b in zip(sr, up)])
    baseline = np.mean([evaluation.thumbnail_correlation(a, b) for a, b in zip(plain, up)])
    assert kept >= SR_KEPT_FLOOR and kept >= baseline + SR_MARGIN, (kept, baseline)
    # The background the 32x32 model drew survives at 64x64.
    same = np.mean([a == b for a, b in zip(clf.predict(list(sr))["background"], clf.predict(up)["background"])])
    assert same >= 0.75, same


def test_a_control_helper_carries_its_sketch_into_the_primarys_latents(trained):
    """tiny-sd15 (another latent space) sees a layout sketch; at weight 1 over every step with its own guidance at 1,
    the primary's image is the sketch's layout (IoU of the image's foreground with the sketched shape), which the
    primary alone does not draw. Measured on 24 prompts: IoU 0.73 against 0.29 (benchmarks/coop_quality.py)."""
    from diffusion import coop, evaluation
    from diffusion.model import GenerationRequest

    primary, _, _, prompts = trained
    sd15 = PanGuDraw.load(shipped_helper_dir("tiny-sd15"), batch_invariant=False)
    reqs = [GenerationRequest(prompt=p.prompt, seed=p.seed, width=64, height=64, steps=20, guidance_scale=6.0,
                              aesthetic_scale=4.0) for p in prompts]
    sketches = [evaluation.layout_sketch(p.shape, 64, 64, seed=p.seed + 777) for p in prompts]
    helper = coop.CoopHelper(sd15, weight=1.0, window=(0.0, 1.0), guidance_scale=1.0,
                             control_image=np.stack([s for s, _ in sketches]))
    fusion = coop.CoopFusion(primary, reqs, [helper])
    controlled = primary.decode(fusion.sample(primary.encode(reqs)))
    alone = primary.generate(reqs)
    iou = [np.mean([evaluation.mask_iou(evaluation.foreground_mask(img), m) for img, (_, m) in zip(imgs, sketches)])
           for imgs in (controlled, alone)]
    assert iou[0] >= 0.55 and iou[0] >= iou[1] + 0.2, iou
    assert fusion.record()[0]["control"] is True and fusion.calls[0] == list(range(20))


def test_the_trained_control_model_puts_the_shape_where_the_sketch_is(trained):
    """tiny-control reads the sketch as an input channel: alone it draws the sketched layout in the prompt's colours,
    and joined to the primary at weight 0.5 over every step it moves the primary's shape onto the sketch. Measured on
    24 prompts (benchmarks/coop_quality_control_model.json): IoU 0.70 alone, 0.63 fused, 0.29 for the primary;
    colour 0.83 alone, 0.79 fused. On these 8: IoU 0.70 / 0.69 / 0.32, fused colour 0.875."""
    from diffusion import coop, evaluation
    from diffusion.model import GenerationRequest

    primary, _, clf, prompts = trained
    model = PanGuDraw.load(shipped_helper_dir("tiny-control"), batch_invariant=False)
    assert model.config.control_channels == 1
    reqs = [GenerationRequest(prompt=p.prompt, seed=p.seed, width=64, height=64, steps=20, guidance_scale=6.0,
                              aesthetic_scale=4.0) for p in prompts]
    sketches = [evaluation.layout_sketch(p.shape, 64, 64, seed=p.seed + 777) for p in prompts]
    alone = model.generate(reqs, [s for s, _ in sketches])
    helper = coop.CoopHelper(model, weight=0.5, window=(0.0, 1.0), control_image=np.stack([s for s, _ in sketches]))
    fusion = coop.CoopFusion(primary, reqs, [helper])
    fused = primary.decode(fusion.sample(primary.encode(reqs)))
    plain = primary.generate(reqs)

    def iou(imgs):
        return np.mean([evaluation.mask_iou(evaluation.foreground_mask(img), m) for img, (_, m) in zip(imgs, sketches)])

    scores = {name: iou(imgs) for name, imgs in (("alone", alone), ("fused", fused), ("plain", plain))}
    assert scores["alone"] >= 0.55 and scores["fused"] >= scores["plain"] + 0.2, scores
    colour = np.mean([c == p.colour for c, p in zip(clf.predict(list(fused))["colour"], prompts)])
    assert colour >= 0.6, colour
    assert fusion.record()[0]["control_mode"] == "input"
