"""The Coop-Diffusion helper models: their recipe's architectures, the shipped trained helpers, and the builtin
aliases that name them (with random stand-ins where a checkout ships none)."""
from __future__ import annotations

import json

import pytest

from actors import fusion
from diffusion.model import PanGuDraw, default_model_dir, read_model_manifest
from diffusion.config import ModelConfig
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
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 6 * 2**20, f"{name} is {size / 2**20:.1f} MB"
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
