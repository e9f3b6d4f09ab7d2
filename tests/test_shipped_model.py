"""The shipped tiny model draws what it is asked, read back by the shipped attribute classifier.

The thresholds are targets: no trained weights have been measured yet. Once they are, set them below what
`pangudraw eval model` measures for the shipped weights, with a margin for the smaller prompt set used here.
"""
from __future__ import annotations

import json

import pytest

from diffusion import evaluation, runtime, synthetic
from diffusion.model import PanGuDraw, default_model_dir
from diffusion.training.recipe import shipped_model_dir

runtime.configure("cpu")

# Until `pangudraw train tiny` has produced weights that are committed, the default model is a random one and
# these checks cannot pass; they are skipped (and say so in the test summary) rather than deleted.
pytestmark = pytest.mark.skipif(not (shipped_model_dir() / "model.json").is_file(),
                                reason="no trained tiny model is shipped yet (diffusion/shipped/pangu-draw-tiny)")

# What these 24 held-out prompts at 20 steps must reach (targets; see the module docstring):
THRESHOLDS = {"colour": 0.8, "shape": 0.6, "background": 0.8, "pattern": 0.4}


@pytest.fixture(scope="module")
def shipped():
    root = default_model_dir()
    assert root.parent.name == "shipped" and root.name == "pangu-draw-tiny"
    return root


def test_the_default_model_is_the_shipped_trained_one(shipped):
    manifest = json.loads((shipped / "model.json").read_text())
    assert manifest["trained"] is True
    assert "synthetic" in manifest["description"]
    size = sum(p.stat().st_size for p in shipped.rglob("*") if p.is_file())
    assert size < 12 * 2**20, f"the shipped model is {size / 2**20:.1f} MB"


def test_held_out_prompts_in_three_languages_and_two_aspects(shipped):
    model = PanGuDraw.load(shipped)
    classifier = evaluation.Classifier.load()
    prompts = synthetic.evaluation_prompts(24)
    assert {p.language for p in prompts} == {"en", "zh", "mixed"} and {p.aspect_bucket for p in prompts} == {5, 7}
    report, images = evaluation.evaluate_model(model, classifier, prompts, steps=20)
    assert {im.shape for im in images} == {(64, 64, 3), (48, 80, 3)}
    adherence = report["adherence"]
    for attr, low in THRESHOLDS.items():
        assert adherence[attr] >= low, (attr, adherence, report["by_language"])
    # Each language on its own reads the colour right in most images.
    for language, acc in report["by_language"].items():
        assert acc["colour"] >= THRESHOLDS["colour"] - 0.15, (language, acc)
