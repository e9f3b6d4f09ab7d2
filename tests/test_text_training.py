"""Contrastive pre-training of the text encoders, and the recipe stage that runs it."""
from __future__ import annotations

import json
from pathlib import Path

import mindspore as ms
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

from diffusion import checkpoints, runtime, synthetic
from diffusion.model import PanGuDraw, read_model_manifest
from diffusion.training import ImageTextSet, OptimConfig
from diffusion.training.config import TextTrainConfig
from diffusion.tiny import build_random_model
from diffusion.training.recipe import (
    CONTRASTIVE_TEXT, TinyModelRecipe, build_tiny_model, check_recipe_settings, contrastive_text_recipe,
    shipped_tiny_config,
    tokenizer_corpus, train_text_stage,
)
from diffusion.training.text_trainer import TextEncoderTrainer
from schemas.errors import UserError

runtime.configure("cpu")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A random model of the shipped layout whose vocabularies hold every caption word (the test preset's do not)."""
    return build_random_model(tmp_path_factory.mktemp("text") / "model", config=shipped_tiny_config(),
                              texts=tokenizer_corpus(), seed=0)


@pytest.fixture(scope="module")
def data():
    rows = list(synthetic.generate_rows(synthetic.SyntheticConfig(num_images=32, seed=13)))
    return ImageTextSet.from_table(pa.Table.from_pylist(rows))


def _cfg(**kw):
    base = dict(steps=4, batch_size=8, checkpoint_every=2, log_every=1, image_side=16, embed_dim=16, tower_width=8,
                optim=OptimConfig(learning_rate=2e-3, warmup_steps=1))
    base.update(kw)
    return TextTrainConfig(**base)


def _log_softmax(z, axis):
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def test_the_loss_is_clips_symmetric_cross_entropy_for_each_encoder(base_dir, data, tmp_path):
    trainer = TextEncoderTrainer(PanGuDraw.load(base_dir, batch_invariant=False), data, _cfg(), tmp_path)
    images, ids_1, ids_2, labels = trainer.make_batch(0).inputs
    assert images.shape == (8, 3, 16, 16) and -1.0 <= images.min() and images.max() <= 1.0
    np.testing.assert_array_equal(labels, np.arange(8))
    tensors = [ms.Tensor(a) for a in (images, ids_1, ids_2, labels)]
    img, t1, t2 = (f.asnumpy().astype(np.float64) for f in trainer.loss.features(*tensors[:3]))
    for f in (img, t1, t2):
        np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)
    scale = 1.0 / 0.07
    expected = 0.0
    for t in (t1, t2):
        logits = img @ t.T * scale
        diag = np.arange(8)
        expected += -_log_softmax(logits, 1)[diag, diag].mean() - _log_softmax(logits, 0)[diag, diag].mean()
    got = float(trainer.loss(*tensors).asnumpy())
    assert got == pytest.approx(expected / 4.0, rel=1e-4)


def test_the_text_stage_learns_to_tell_captions_apart_and_keeps_the_rest(base_dir, data, tmp_path):
    config = _cfg(steps=120, batch_size=16, checkpoint_every=60, log_every=20, ema_decay=0.0, tower_width=16,
                  optim=OptimConfig(learning_rate=3e-3, warmup_steps=10))
    report = train_text_stage(base_dir, data, config, tmp_path / "run", tmp_path / "out")
    assert report["steps"] == 120 and report["images_seen"] == 120 * 16
    # 32 images: a caption finds its own image by chance 1 time in 32.
    for name, acc in report["retrieval_at_256"].items():
        assert acc >= 0.2, (name, report)  # measured 0.34 for both
    assert report["final_loss"] < 0.6 * np.log(16), report
    base = PanGuDraw.load(base_dir, batch_invariant=False)
    out = PanGuDraw.load(tmp_path / "out", batch_invariant=False)
    for name in ("text_encoder_1", "text_encoder_2"):
        before, after = checkpoints.state_dict(base.nets[name]), checkpoints.state_dict(out.nets[name])
        assert before.keys() == after.keys()
        moved = [k for k in before if not np.array_equal(before[k], after[k])]
        assert len(moved) > len(before) // 2, (name, moved)
    for name in ("vae", "structure_unet", "texture_unet"):
        before, after = checkpoints.state_dict(base.nets[name]), checkpoints.state_dict(out.nets[name])
        assert all(np.array_equal(before[k], after[k]) for k in before), name
    # The image tower and heads stay in the run's checkpoints, not in the model; the UNets are marked stale.
    manifest = read_model_manifest(tmp_path / "out")
    assert manifest["trained"] is False
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert files == sorted(f"{n}.safetensors" for n in ("structure_unet", "texture_unet", "vae", "text_encoder_1",
                                                         "text_encoder_2"))
    for name in ("text_encoder_1", "text_encoder_2"):
        keys = load_file(tmp_path / "out" / f"{name}.safetensors").keys()
        assert keys == checkpoints.state_dict(base.nets[name]).keys()


def test_a_stopped_text_stage_resumes_to_the_same_weights(base_dir, data, tmp_path):
    config = _cfg(ema_decay=0.5)
    straight = TextEncoderTrainer(PanGuDraw.load(base_dir, batch_invariant=False), data, config, tmp_path / "a")
    straight.train()
    first = TextEncoderTrainer(PanGuDraw.load(base_dir, batch_invariant=False), data, config, tmp_path / "b")
    first.train(stop_after=2)
    resumed = TextEncoderTrainer(PanGuDraw.load(base_dir, batch_invariant=False), data, config, tmp_path / "b")
    resumed.train()
    a, b = straight.loop.state(), resumed.loop.state()
    assert resumed.loop.step == 4 and a.keys() == b.keys()
    assert any(k.startswith("param/contrastive/tower") for k in a)  # the image tower resumes too
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_too_few_images_for_the_batch_is_a_clear_error(base_dir, data, tmp_path):
    with pytest.raises(ValueError, match="batch of 64 needs at least that many images; the data set has 32"):
        TextEncoderTrainer(PanGuDraw.load(base_dir, batch_invariant=False), data, _cfg(batch_size=64), tmp_path)


def test_the_recipe_refuses_a_work_directory_of_other_settings(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    variant = contrastive_text_recipe()
    (work / "report.json").write_text(json.dumps({"stages": {}, "recipe": json.loads(variant.model_dump_json())}))
    with pytest.raises(UserError, match=r"other recipe settings \(final_structure, structure, structure_prediction, "
                                        r"structure_unet, text;"):
        build_tiny_model(tmp_path / "out", work, TinyModelRecipe())
    assert not (work / "data").exists()
    # A report written before the text stage existed lacks its settings: that run had none and epsilon-prediction.
    legacy = json.loads(TinyModelRecipe().model_dump_json())
    del legacy["text"], legacy["structure_prediction"]
    assert check_recipe_settings({"recipe": legacy}, TinyModelRecipe(), work / "report.json") == \
        json.loads(TinyModelRecipe().model_dump_json())
    with pytest.raises(UserError, match="text"):
        check_recipe_settings({"recipe": legacy}, variant, work / "report.json")
    # One written before the final structure stage existed trained a single structure generator of the shipped
    # layout: it is not the default recipe's run, but that of the recipe without the final stage.
    older = json.loads(TinyModelRecipe().model_dump_json())
    del older["final_structure"], older["structure_unet"], older["text_learns_in"]
    with pytest.raises(UserError, match=r"\(final_structure, structure_unet;"):
        check_recipe_settings({"recipe": older}, TinyModelRecipe(), work / "report.json")
    single = TinyModelRecipe(final_structure=None, structure_unet={})
    assert check_recipe_settings({"recipe": older}, single, work / "report.json") == \
        json.loads(single.model_dump_json())


def test_cli_trains_the_text_encoders_and_a_structure_stage_that_keeps_them(base_dir, tmp_path, capsys):
    from jobs import cli

    rows = list(synthetic.generate_rows(synthetic.SyntheticConfig(num_images=32, seed=13)))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    code = cli.main(["train", "text", "--data", str(tmp_path / "data.parquet"), "--model", str(base_dir),
                     "--batch-size", "64", "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert code == 2 and "--batch-size 64 is more than the 32 training images" in err and "Traceback" not in err
    code = cli.main(["train", "text", "--data", str(tmp_path / "data.parquet"), "--model", str(base_dir),
                     "--steps", "2", "--batch-size", "8", "--out", str(tmp_path / "t")])
    assert code == 0, capsys.readouterr().err
    assert "text trained for 2 steps" in capsys.readouterr().out
    report = json.loads((tmp_path / "t" / "training.json").read_text())
    assert set(report["retrieval_at_256"]) == {"text_encoder_1", "text_encoder_2"}
    code = cli.main(["train", "unet", "--mode", "structure", "--freeze-text", "--data", str(tmp_path / "data.parquet"),
                     "--model", str(tmp_path / "t"), "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "s")])
    assert code == 0, capsys.readouterr().err
    text, structure = (PanGuDraw.load(tmp_path / d, batch_invariant=False) for d in ("t", "s"))
    for name in ("text_encoder_1", "text_encoder_2"):
        a, b = checkpoints.state_dict(text.nets[name]), checkpoints.state_dict(structure.nets[name])
        assert all(np.array_equal(a[k], b[k]) for k in a), name
    a, b = checkpoints.state_dict(text.nets["structure_unet"]), checkpoints.state_dict(structure.nets["structure_unet"])
    assert any(not np.array_equal(a[k], b[k]) for k in a)


_RECIPE_RUN = """
import json, os, sys
from diffusion import runtime
from diffusion.model import GenerationRequest, PanGuDraw
from diffusion.training.recipe import TinyModelRecipe, build_tiny_model
runtime.configure("cpu")
base = TinyModelRecipe()
small = dict(steps=2, batch_size=4, checkpoint_every=2, log_every=1)
recipe = base.model_copy(update={
    "data": base.data.model_copy(update={"num_images": 24}),
    "vae": base.vae.model_copy(update=dict(small, steps=1)),
    "structure": base.structure.model_copy(update=small),
    "texture": base.texture.model_copy(update=small),
    "final_structure": base.final_structure.model_copy(update=small)})
report = build_tiny_model(sys.argv[1], sys.argv[2], recipe)
written = os.stat(os.path.join(sys.argv[1], "structure_unet.safetensors")).st_mtime_ns
again = build_tiny_model(sys.argv[1], sys.argv[2], recipe)
image, = PanGuDraw.load(sys.argv[1], batch_invariant=False).generate(
    [GenerationRequest(prompt="a red circle on a blue background", seed=1, width=80, height=48, steps=4)])
print(json.dumps({"stages": list(report["stages"]), "again": list(again["stages"]),
                  "rewritten": os.stat(os.path.join(sys.argv[1], "structure_unet.safetensors")).st_mtime_ns != written,
                  "image_shape": list(image.shape), "image_std": float(image.std())}))
"""


FILE_NAMES = ("structure_unet", "texture_unet", "vae", "text_encoder_1", "text_encoder_2")


def _weights(directory, name):
    return load_file(str(directory / f"{name}.safetensors"))


def _same(directory_a, directory_b, name) -> bool:
    """The same weights, as stored in directory_b (the recipe's output stores float16, its stages float32)."""
    a, b = _weights(directory_a, name), _weights(directory_b, name)
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and np.array_equal(a[k].astype(b[k].dtype), b[k])
                                        for k in a)


def test_the_recipe_trains_the_text_encoders_with_a_first_structure_generator_and_ships_a_coarser_one(tmp_path):
    """The default recipe at a few steps, end to end: structure (moves the text encoders), texture, then a fresh
    patch-2 structure generator against the frozen encoders, which ships; a second call trains nothing. The recipe
    runs in a child process: its compiled graphs would otherwise stay in this test worker's memory."""
    import subprocess
    import sys

    work, out = tmp_path / "work", tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", _RECIPE_RUN, str(out), str(work)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["stages"] == result["again"] == ["data", "vae", "structure", "texture", "final_structure"]
    assert result["rewritten"] is False
    assert result["image_shape"] == [48, 80, 3] and result["image_std"] > 0
    manifest = read_model_manifest(out)
    config = manifest["config"]
    assert (config["structure_unet"]["patch_size"], config["structure_unet"]["model_channels"]) == (2, 64)
    assert (config["texture_unet"]["patch_size"], config["texture_unet"]["model_channels"]) == (1, 32)
    assert manifest["trained"] is True
    # The model written last stores float16 (half the bytes); the stages' own directories keep float32.
    assert manifest["weights_dtype"] == "float16"
    assert {v.dtype for n in FILE_NAMES for v in _weights(out, n).values()} == {np.dtype(np.float16)}
    assert {v.dtype for n in FILE_NAMES for v in _weights(work / "models" / "texture", n).values()} == \
        {np.dtype(np.float32)}
    assert "model_channels 64, patch_size 2, trained fresh against the frozen text encoders" in manifest["description"]
    vae_dir, structure_dir, texture_dir = (work / "models" / n for n in ("vae", "structure", "texture"))
    assert read_model_manifest(structure_dir)["config"]["structure_unet"]["patch_size"] == 1
    for name in ("text_encoder_1", "text_encoder_2"):
        assert not _same(vae_dir, structure_dir, name), name  # the first structure generator moved them
        assert _same(structure_dir, texture_dir, name) and _same(texture_dir, out, name), name  # then kept
    assert not _same(structure_dir, texture_dir, "texture_unet")
    assert _same(texture_dir, out, "texture_unet") and _same(texture_dir, out, "vae")
    first, final = _weights(structure_dir, "structure_unet"), _weights(out, "structure_unet")
    assert first["input_blocks.0.0.weight"].shape == (32, 4, 3, 3)
    assert final["input_blocks.0.0.weight"].shape == (64, 16, 3, 3)  # 4 latent channels x 2 x 2 in, 64 out


def test_the_recipe_runs_its_stages_in_order_for_each_way_of_training_the_text_encoders(base_dir, tmp_path,
                                                                                      monkeypatch):
    """Which stage starts from which model, writes where, and whether its text encoders learn, for the default
    recipe, the recipe without a final structure stage, text learning in the texture stage, and a contrastive text
    stage. The stages are replaced by a copy of their input model (the training itself is tested above and in
    test_training.py); the data and VAE stages are done beforehand."""
    import shutil

    from diffusion.config import ModelConfig
    from diffusion.training import recipe as recipe_module

    calls = []

    def stage(in_dir, data, config, run_dir, out_dir, *, model_config=None, seed=0, description="", trained=True):
        calls.append((Path(run_dir).name, Path(in_dir).name, Path(out_dir).name, config.resolved().train_text_encoders,
                      model_config, seed, config.steps, trained))
        shutil.copytree(in_dir, out_dir)
        return {"seconds": 0.0}

    def text_stage(in_dir, data, config, run_dir, out_dir):
        calls.append(("text", Path(in_dir).name, Path(out_dir).name, True, None, 0, config.steps, False))
        shutil.copytree(in_dir, out_dir)
        return {"seconds": 0.0}

    monkeypatch.setattr(recipe_module, "train_diffusion_stage", stage)
    monkeypatch.setattr(recipe_module, "train_text_stage", text_stage)
    default = TinyModelRecipe()
    default = default.model_copy(update={"data": default.data.model_copy(update={"num_images": 16})})

    def run(name, recipe):
        work = tmp_path / name
        shutil.copytree(base_dir, work / "models" / "vae")
        calls.clear()
        build_tiny_model(work / "out", work, recipe)
        done = list(calls)
        calls.clear()
        build_tiny_model(work / "out", work, recipe)  # every stage is done: nothing runs
        assert calls == [], name
        return done

    done = run("default", default)
    assert [c[:4] for c in done] == [("structure", "vae", "structure", True), ("texture", "structure", "texture", False),
                                     ("final_structure", "texture", "out", False)]
    final_config = done[2][4]
    assert isinstance(final_config, ModelConfig)
    assert (final_config.structure_unet.patch_size, final_config.structure_unet.model_channels) == (2, 64)
    base_config = ModelConfig.model_validate(read_model_manifest(base_dir)["config"])
    assert final_config.texture_unet == base_config.texture_unet and final_config.vae == base_config.vae
    assert done[2][5:] == (default.model_seed, default.final_structure.steps, True)
    assert [c[4] for c in done[:2]] == [None, None] and [c[7] for c in done[:2]] == [False, False]

    done = run("single", default.model_copy(update={"final_structure": None, "structure_unet": {}}))
    assert [c[:4] for c in done] == [("structure", "vae", "structure", True), ("texture", "structure", "out", False)]
    done = run("texture", default.model_copy(update={"final_structure": None, "text_learns_in": "texture"}))
    assert [c[:4] for c in done] == [("texture", "vae", "texture", True), ("structure", "texture", "out", False)]
    done = run("contrastive", contrastive_text_recipe(default))
    assert [c[:4] for c in done] == [("text", "vae", "text", True), ("texture", "text", "texture", False),
                                     ("structure", "texture", "out", False)]


def test_the_recipe_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="patch_size"):
        TinyModelRecipe(structure_unet={"patch_size": 0})
    with pytest.raises(ValueError, match="context_dim: not a layout setting"):
        TinyModelRecipe(structure_unet={"context_dim": 32})
    with pytest.raises(ValueError, match="final_structure: only when the structure stage trains the text encoders"):
        TinyModelRecipe(text_learns_in="texture")
    with pytest.raises(ValueError, match="final_structure: only when"):
        TinyModelRecipe(text=CONTRASTIVE_TEXT)
    with pytest.raises(ValueError, match="train_text_encoders False"):
        TinyModelRecipe(final_structure=TinyModelRecipe().final_structure.model_copy(
            update={"train_text_encoders": True}).model_dump())
    assert TinyModelRecipe(text_learns_in="texture", final_structure=None).final_structure is None
