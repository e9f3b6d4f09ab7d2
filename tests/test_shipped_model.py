"""The shipped tiny model draws what it is asked, read back by the shipped attribute classifier.

Measured for the shipped weights on these 24 held-out prompts at 20 steps (guidance 6, aesthetic 4): shape 0.458,
colour 0.875, background 0.917, pattern 0.417 (per language, colour: en, zh and mixed 0.875 each). On 96 prompts
`pangudraw eval model --count 96 --steps 20` gives shape 0.396, colour 0.875, background 0.979, pattern 0.406. The
floors below sit under those figures; shape is over chance (0.25) but under the 0.6 target, whose check is an
expected failure that turns into an error once a model draws shapes that well.
"""
from __future__ import annotations

import json

import pytest

from diffusion import evaluation, runtime, synthetic
from diffusion.model import PanGuDraw, default_model_dir
from diffusion.training.recipe import shipped_model_dir

runtime.configure("cpu")

pytestmark = pytest.mark.skipif(not (shipped_model_dir() / "model.json").is_file(),
                                reason="no trained tiny model is shipped (diffusion/shipped/pangu-draw-tiny)")

FLOORS = {"shape": 0.35, "colour": 0.8, "background": 0.85, "pattern": 0.3}
SHAPE_TARGET = 0.6


@pytest.fixture(scope="module")
def shipped():
    root = default_model_dir()
    assert root == shipped_model_dir()
    return root


@pytest.fixture(scope="module")
def evaluated(shipped):
    model = PanGuDraw.load(shipped)
    prompts = synthetic.evaluation_prompts(24)
    assert {p.language for p in prompts} == {"en", "zh", "mixed"} and {p.aspect_bucket for p in prompts} == {5, 7}
    report, images = evaluation.evaluate_model(model, evaluation.Classifier.load(), prompts, steps=20)
    return report, images


def test_the_default_model_is_the_shipped_trained_one(shipped):
    manifest = json.loads((shipped / "model.json").read_text())
    assert manifest["trained"] is True
    assert "synthetic" in manifest["description"]
    assert manifest["config"]["vae"]["norm_groups"] == 0
    assert manifest["config"]["structure_unet"]["patch_size"] == 2
    # Stored as float16 (`pangudraw train tiny` writes it so): 10.3 MB of weights where float32 took 20.5.
    assert manifest["weights_dtype"] == "float16"
    size = sum(p.stat().st_size for p in shipped.rglob("*") if p.is_file())
    assert size < 12 * 2**20, f"the shipped model is {size / 2**20:.1f} MB"


def test_every_aspect_bucket_is_drawn_though_the_structure_generators_levels_do_not_divide_six_of_them(shipped):
    """The structure generator folds 2x2 latent pixels and halves once more: 72x56 is 14x18 latents, 7x9 folded, an
    odd side for its stride-2 level. All 11 buckets are planned, and a prompt at 72x56 gets its colours."""
    from diffusion import buckets
    from diffusion.model import GenerationRequest

    model = PanGuDraw.load(shipped)
    sizes = buckets.bucket_sizes(0.125)
    assert len(sizes) == 11
    for width, height in sizes:
        assert model.plan(GenerationRequest(prompt="a star", seed=0, width=width, height=height)).size.width == width
    images = model.generate([GenerationRequest(prompt="a red square on a blue background", seed=seed, width=72,
                                               height=56, steps=20) for seed in (0, 1)])
    for image in images:
        assert image.shape == (56, 72, 3)
        px = image.reshape(-1, 3).astype(int)
        red = (px[:, 0] > 150) & (px[:, 2] < 110)
        blue = (px[:, 2] > 150) & (px[:, 0] < 110)
        assert 0.05 < red.mean() < 0.6 and blue.mean() > 0.3, (red.mean(), blue.mean())


def test_held_out_prompts_get_their_shape_colour_background_and_pattern(evaluated):
    report, images = evaluated
    assert {im.shape for im in images} == {(64, 64, 3), (48, 80, 3)}
    adherence = report["adherence"]
    for attr, low in FLOORS.items():
        assert adherence[attr] >= low, (attr, adherence, report["by_language"])
    # English, Chinese and mixed prompts each get the colour right in most images.
    for language, acc in report["by_language"].items():
        assert acc["colour"] >= FLOORS["colour"] - 0.15, (language, acc)


@pytest.mark.xfail(strict=True, reason="the shipped model draws the asked shape in under half of the images "
                                      "(measured 0.458; chance 0.25; target 0.6)")
def test_held_out_prompts_get_their_shape_as_often_as_the_target(evaluated):
    report, _ = evaluated
    assert report["adherence"]["shape"] >= SHAPE_TARGET, report["adherence"]
