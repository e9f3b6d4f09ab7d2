"""Model directories stored as float16: `convert_weights`, `PanGuDraw.save(weights_dtype=...)`, `pangudraw convert`."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from diffusion.checkpoints import CheckpointError
from diffusion.model import GenerationRequest, PanGuDraw, convert_weights, model_hash, read_model_manifest

FILES = ("structure_unet", "texture_unet", "vae", "text_encoder_1", "text_encoder_2")


def _bytes(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _image(root):
    model = PanGuDraw.load(root, batch_invariant=False)
    image, = model.generate([GenerationRequest(prompt="a red circle on a blue background", seed=3, width=64,
                                               height=64, steps=4)])
    return image.astype(np.int16)


def test_float16_halves_the_weights_keeps_every_value_to_float16_rounding_and_draws_the_same_image(
        tiny_model_dir, tmp_path):
    before = _bytes(tiny_model_dir)
    out = tmp_path / "half"
    result = convert_weights(tiny_model_dir, "float16", out)
    assert _bytes(tiny_model_dir) == before  # the source is untouched
    manifest, source = read_model_manifest(out), read_model_manifest(tiny_model_dir)
    assert manifest["weights_dtype"] == "float16" and source.get("weights_dtype", "float32") == "float32"
    assert sorted(p.name for p in out.rglob("*") if p.is_file() and not p.name.endswith("safetensors")) == \
        sorted(p.name for p in tiny_model_dir.rglob("*") if p.is_file() and not p.name.endswith("safetensors"))
    for name in FILES:
        a, b = load_file(str(tiny_model_dir / f"{name}.safetensors")), load_file(str(out / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert b[key].dtype == np.float16 and b[key].shape == a[key].shape, key
            np.testing.assert_array_equal(b[key], a[key].astype(np.float16), err_msg=key)
        hashed = hashlib.sha256((out / f"{name}.safetensors").read_bytes()).hexdigest()[:16]
        assert manifest["file_hashes"][f"{name}.safetensors"] == hashed
    assert manifest["hash"] == model_hash(manifest["file_hashes"]) != source["hash"]
    assert result["bytes_after"] < 0.52 * result["bytes_before"]
    assert result["hash"] == manifest["hash"]
    # Loading casts back to float32: the same image to within a few levels where the weights were rounded.
    full, half = _image(tiny_model_dir), _image(out)
    assert full.shape == half.shape == (64, 64, 3)
    assert np.abs(full - half).mean() < 1.0 and np.abs(full - half).max() <= 24
    assert PanGuDraw.load(out, batch_invariant=False).identity["hash"] == manifest["hash"]

    # Back to float32 in place: the float16 values, widened.
    convert_weights(out, "float32")
    back = load_file(str(out / "vae.safetensors"))
    assert all(v.dtype == np.float32 for v in back.values())
    half_vae = {k: v.astype(np.float16) for k, v in load_file(str(tiny_model_dir / "vae.safetensors")).items()}
    assert all(np.array_equal(back[k], half_vae[k].astype(np.float32)) for k in back)
    assert read_model_manifest(out)["weights_dtype"] == "float32"


def test_save_writes_float16_files_equal_to_a_conversion(tiny_model_dir, tmp_path):
    model = PanGuDraw.load(tiny_model_dir, batch_invariant=False)
    model.save(tmp_path / "saved", weights_dtype="float16")
    convert_weights(tiny_model_dir, "float16", tmp_path / "converted")
    saved, converted = read_model_manifest(tmp_path / "saved"), read_model_manifest(tmp_path / "converted")
    assert saved["weights_dtype"] == "float16"
    assert saved["file_hashes"] == converted["file_hashes"] and saved["hash"] == converted["hash"]


def test_a_weight_float16_cannot_hold_is_refused_by_name_and_nothing_changes(tiny_model_dir, tmp_path):
    root = tmp_path / "model"
    shutil.copytree(tiny_model_dir, root)
    state = load_file(str(root / "vae.safetensors"))
    key = sorted(state)[0]
    state[key] = state[key].copy()
    state[key].flat[0] = 1.0e6
    save_file(state, str(root / "vae.safetensors"))
    before = _bytes(root)
    with pytest.raises(CheckpointError, match=rf"{key} reaches 1e\+06, beyond float16's 65504"):
        convert_weights(root, "float16")
    assert _bytes(root) == before  # not even the files before vae.safetensors were rewritten


def test_pangudraw_convert_command(tiny_model_dir, tmp_path, capsys):
    from jobs.cli import main

    assert main(["convert", str(tiny_model_dir), "--out", str(tmp_path / "small")]) == 0
    printed = capsys.readouterr().out
    assert "weights stored as float16" in printed and "MB ->" in printed
    assert json.loads((tmp_path / "small" / "model.json").read_text())["weights_dtype"] == "float16"
    # A user's mistakes: a clear message, exit status 2, no traceback.
    assert main(["convert", str(tmp_path / "nothing")]) == 2
    assert main(["convert", str(tiny_model_dir), "--out", str(tmp_path / "small")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "exists; name a new directory" in err and "Traceback" not in err
