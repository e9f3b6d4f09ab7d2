"""Weights files: our safetensors, the released .ckpt layout, diffusers names, and the errors users see."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from diffusion import checkpoints as ck
from diffusion.config import PANGU_DRAW_V3, tiny_config
from diffusion.nets.layers import timestep_embedding_np
from diffusion.nets.text_encoders import CLIPTextEncoder, OpenCLIPTextEncoder
from diffusion.nets.unet import UNet
from diffusion.nets.vae import AutoencoderKL
from schemas.errors import UserError

TINY = tiny_config()
REPO = Path(__file__).resolve().parents[1]


def randomize(cell, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, p in cell.parameters_and_names():
        shape = tuple(p.shape)
        if name.endswith("gamma"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) > 1:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        else:
            value = 0.1 * rng.standard_normal(shape)
        p.set_data(ms.Tensor(value.astype(np.float32)).astype(p.dtype))


def make_unet(seed: int | None = None) -> UNet:
    net = UNet(TINY.structure_unet)
    net.set_train(False)
    if seed is not None:
        randomize(net, seed)
    return net


def unet_inputs(batch: int = 2, seed: int = 0):
    cfg = TINY.structure_unet
    rng = np.random.default_rng(seed)
    return (ms.Tensor(rng.standard_normal((batch, 4, 16, 16)).astype(np.float32)),
            ms.Tensor(np.array([999, 250][:batch], np.int32)),
            ms.Tensor(rng.standard_normal((batch, 77, cfg.context_dim)).astype(np.float32)),
            ms.Tensor(rng.standard_normal((batch, cfg.adm_in_channels)).astype(np.float32)))


@pytest.fixture(scope="module")
def unet():
    return make_unet(seed=11)


@pytest.fixture(scope="module")
def eps(unet):
    return unet(*unet_inputs()).asnumpy()


def assert_same_params(a, b):
    sa, sb = ck.state_dict(a), ck.state_dict(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)


# ---------------------------------------------------------------- our safetensors files

def test_save_load_round_trip_gives_the_same_output(tmp_path, unet, eps):
    path = tmp_path / "unet.safetensors"
    ck.save_weights(unet, path)
    fresh = make_unet(seed=99)
    assert np.abs(fresh(*unet_inputs()).asnumpy() - eps).max() > 1e-3
    ck.load_weights(fresh, path)
    assert_same_params(unet, fresh)
    np.testing.assert_array_equal(fresh(*unet_inputs()).asnumpy(), eps)
    assert not list(tmp_path.glob("*.tmp"))


def test_weights_hash_is_the_file_sha256_and_changes_with_a_weight(tmp_path, unet):
    import hashlib

    path = tmp_path / "a.safetensors"
    ck.save_weights(unet, path)
    assert ck.weights_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    ck.save_weights(unet, tmp_path / "b.safetensors")
    assert ck.weights_hash(tmp_path / "b.safetensors") == ck.weights_hash(path)
    other = make_unet(seed=11)
    other.out[2].bias.set_data(other.out[2].bias + 1.0)
    ck.save_weights(other, tmp_path / "c.safetensors")
    assert ck.weights_hash(tmp_path / "c.safetensors") != ck.weights_hash(path)


def test_load_casts_to_the_cells_dtype(tmp_path, unet):
    path = tmp_path / "unet.safetensors"
    ck.save_weights(unet, path)
    half = UNet(TINY.structure_unet, dtype=ms.float16)
    ck.load_weights(half, path)
    got = ck.state_dict(half)["out.2.weight"]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, ck.state_dict(unet)["out.2.weight"].astype(np.float16))


def test_missing_parameter_error_names_file_and_parameter(tmp_path, unet):
    state = ck.state_dict(unet)
    del state["middle_block.1.proj_in.weight"]
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_state(make_unet(), state, source="weights/unet.safetensors")
    assert isinstance(err.value, UserError)
    assert "weights/unet.safetensors" in str(err.value)
    assert "middle_block.1.proj_in.weight" in str(err.value) and "missing" in str(err.value)


def test_unexpected_parameter_error_and_non_strict_load(unet):
    state = ck.state_dict(unet)
    state["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ck.CheckpointError, match=r"src\.ckpt: 1 unexpected parameter\(s\): extra\.weight"):
        ck.load_state(make_unet(), state, source="src.ckpt")
    del state["out.2.bias"]
    fresh = make_unet(seed=5)
    kept = ck.state_dict(fresh)["out.2.bias"]
    ck.load_state(fresh, state, source="src.ckpt", strict=False)
    loaded = ck.state_dict(fresh)
    np.testing.assert_array_equal(loaded["out.2.bias"], kept)
    np.testing.assert_array_equal(loaded["out.2.weight"], state["out.2.weight"])


def test_shape_mismatch_error_gives_expected_and_found_shapes_and_changes_nothing(tmp_path, unet):
    state = ck.state_dict(unet)
    state["label_emb.0.0.weight"] = np.zeros((128, 99), np.float32)
    fresh = make_unet(seed=5)
    before = ck.state_dict(fresh)
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_state(fresh, state, source="x.safetensors")
    msg = str(err.value)
    assert "x.safetensors" in msg and "label_emb.0.0.weight" in msg
    assert "(128, 99)" in msg and "(128, 48)" in msg
    after = ck.state_dict(fresh)
    assert all(np.array_equal(before[n], after[n]) for n in before)


def test_unreadable_files_raise_checkpoint_errors(tmp_path):
    with pytest.raises(ck.CheckpointError, match="not found"):
        ck.load_weights(make_unet(), tmp_path / "absent.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 5 + b"not a safetensors file")
    with pytest.raises(ck.CheckpointError, match="junk.safetensors"):
        ck.load_weights(make_unet(), junk)
    bad_ckpt = tmp_path / "bad.ckpt"
    bad_ckpt.write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(ck.CheckpointError, match="bad.ckpt"):
        ck.read_released(bad_ckpt, ["unet"])


# ---------------------------------------------------------------- released .ckpt layout

@pytest.fixture(scope="module")
def released_states(unet):
    vae = AutoencoderKL(TINY.vae)
    te1 = CLIPTextEncoder(TINY.text_encoder_1)
    te2 = OpenCLIPTextEncoder(TINY.text_encoder_2)
    for i, cell in enumerate((vae, te1, te2)):
        randomize(cell, 20 + i)
    return {"unet": ck.state_dict(unet), "vae": ck.state_dict(vae), "text_encoder_1": ck.state_dict(te1),
            "text_encoder_2": ck.state_dict(te2)}


def test_released_round_trip_gives_the_same_output(tmp_path, released_states, eps):
    path = tmp_path / "pangu_low_timestamp.ckpt"
    ck.write_released(path, released_states)
    names = set(ms.load_checkpoint(str(path)))
    # The release's garbled alias for text encoder 1's token table, and full released names elsewhere.
    assert ck.GARBLED_TOKEN_TABLE in names
    assert "model.diffusion_model.input_blocks.0.0.weight" in names
    assert "first_stage_model.encoder.conv_in.weight" in names

    states = ck.read_released(path, ["unet", "text_encoder_1", "text_encoder_2", "vae"])
    for component, state in released_states.items():
        assert states[component].keys() == state.keys(), component
        for name in state:
            np.testing.assert_array_equal(states[component][name], state[name], err_msg=f"{component} {name}")
    fresh = make_unet(seed=7)
    ck.load_state(fresh, states["unet"], source=str(path))
    np.testing.assert_array_equal(fresh(*unet_inputs()).asnumpy(), eps)
    te1 = CLIPTextEncoder(TINY.text_encoder_1)
    ck.load_state(te1, states["text_encoder_1"], source=str(path))


def test_read_released_returns_only_the_requested_components(tmp_path, released_states):
    path = tmp_path / "structure.ckpt"
    ck.write_released(path, released_states, garbled_token_table=False)
    only_unet = ck.read_released(path, ["unet"])
    assert list(only_unet) == ["unet"]
    assert only_unet["unet"].keys() == released_states["unet"].keys()
    te2 = ck.read_released(path, ["text_encoder_2"])["text_encoder_2"]
    # Encoder 1's table, garbled or not, never leaks into encoder 2.
    assert te2.keys() == released_states["text_encoder_2"].keys()
    with pytest.raises(ck.CheckpointError, match="unknown component"):
        ck.read_released(path, ["unet", "controlnet"])
    ck.write_released(tmp_path / "unet_only.ckpt", {"unet": released_states["unet"]})
    with pytest.raises(ck.CheckpointError, match=r"unet_only\.ckpt: no parameters of vae"):
        ck.read_released(tmp_path / "unet_only.ckpt", ["vae"])


def test_reader_matches_mindspore_loader_on_split_tensors_and_crc_trailer(tmp_path, monkeypatch):
    import mindspore.train.serialization as serialization

    rng = np.random.default_rng(3)
    tensors = {
        "model.diffusion_model.big.weight": rng.standard_normal((300, 17)).astype(np.float32),
        "model.diffusion_model.half.weight": rng.standard_normal((5, 3)).astype(np.float16),
        "model.diffusion_model.step": np.array(7, np.int32),
        "first_stage_model.scale": rng.standard_normal((4,)).astype(np.float32),
    }
    # Force MindSpore's writer to split tensors above 8 KB into several records of one name.
    monkeypatch.setattr(serialization, "SLICE_SIZE", 8)
    path = tmp_path / "ms_written.ckpt"
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in tensors.items()], str(path), crc_check=True)
    ours = ck.read_ckpt(path)
    for name, value in tensors.items():
        assert ours[name].dtype == value.dtype and ours[name].shape == value.shape, name
        np.testing.assert_array_equal(ours[name], value)
    # And MindSpore's loader reads what our writer writes, split records included.
    monkeypatch.setattr(ck, "_SLICE_BYTES", 1000)
    ck.write_ckpt(tmp_path / "ours.ckpt", tensors)
    loaded = ms.load_checkpoint(str(tmp_path / "ours.ckpt"))
    for name, value in tensors.items():
        np.testing.assert_array_equal(loaded[name].asnumpy(), value)
    assert ck.read_ckpt(tmp_path / "ours.ckpt", keep=lambda n: n.endswith("scale")).keys() == {"first_stage_model.scale"}


def test_truncated_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "cut.ckpt"
    ck.write_ckpt(path, {"model.diffusion_model.w": np.ones((64, 64), np.float32)})
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ck.CheckpointError, match="cut.ckpt"):
        ck.read_released(path, ["unet"])


# ---------------------------------------------------------------- diffusers names

def test_diffusers_unet_names_for_the_full_size_config():
    mapping = ck.diffusers_unet_name_map(PANGU_DRAW_V3.structure_unet)
    assert len(mapping) == 1680 and len(set(mapping.values())) == 1680
    known = {
        "time_embed.0.weight": "time_embedding.linear_1.weight",
        "label_emb.0.2.bias": "add_embedding.linear_2.bias",
        "input_blocks.0.0.weight": "conv_in.weight",
        "input_blocks.1.0.in_layers.0.gamma": "down_blocks.0.resnets.0.norm1.weight",
        "input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
        "input_blocks.4.0.skip_connection.weight": "down_blocks.1.resnets.0.conv_shortcut.weight",
        "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight":
            "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight",
        "input_blocks.8.1.proj_out.bias": "down_blocks.2.attentions.1.proj_out.bias",
        "middle_block.1.transformer_blocks.9.ff.net.0.proj.weight":
            "mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj.weight",
        "middle_block.2.out_layers.3.bias": "mid_block.resnets.1.conv2.bias",
        "output_blocks.0.0.emb_layers.1.weight": "up_blocks.0.resnets.0.time_emb_proj.weight",
        "output_blocks.2.2.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
        "output_blocks.5.1.transformer_blocks.0.norm3.beta": "up_blocks.1.attentions.2.transformer_blocks.0.norm3.bias",
        "output_blocks.5.2.conv.bias": "up_blocks.1.upsamplers.0.conv.bias",
        "output_blocks.8.0.skip_connection.weight": "up_blocks.2.resnets.2.conv_shortcut.weight",
        "out.0.gamma": "conv_norm_out.weight",
        "out.2.weight": "conv_out.weight",
    }
    assert {k: mapping[k] for k in known} == known


def test_diffusers_unet_file_round_trip(tmp_path, unet, eps):
    mapping = ck.diffusers_unet_name_map(TINY.structure_unet)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    ck.write_diffusers(path, ck.state_dict(unet), mapping)
    from safetensors.numpy import load_file

    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight" in load_file(str(path))
    fresh = make_unet(seed=3)
    ck.load_state(fresh, ck.read_diffusers_unet(path, TINY.structure_unet), source=str(path))
    np.testing.assert_array_equal(fresh(*unet_inputs()).asnumpy(), eps)


def test_diffusers_unet_shape_mismatch_names_both_names(tmp_path, unet):
    mapping = ck.diffusers_unet_name_map(TINY.structure_unet)
    state = ck.state_dict(unet)
    state["label_emb.0.0.weight"] = np.zeros((128, 2816), np.float32)
    path = tmp_path / "sdxl_unet.safetensors"
    ck.write_diffusers(path, state, mapping)
    with pytest.raises(ck.CheckpointError) as err:
        ck.read_diffusers_unet(path, TINY.structure_unet)
    msg = str(err.value)
    assert "sdxl_unet.safetensors" in msg and "add_embedding.linear_1.weight" in msg and "label_emb.0.0.weight" in msg
    assert "(128, 2816)" in msg and "(128, 48)" in msg


@pytest.mark.parametrize("legacy", [False, True])
def test_diffusers_vae_file_round_trip(tmp_path, legacy):
    vae = AutoencoderKL(TINY.vae)
    randomize(vae, 4)
    mapping = ck.diffusers_vae_name_map(TINY.vae, legacy_attention=legacy)
    assert mapping["encoder.down.0.block.0.norm1.gamma"] == "encoder.down_blocks.0.resnets.0.norm1.weight"
    assert mapping["decoder.up.0.block.1.conv2.bias"] == "decoder.up_blocks.2.resnets.1.conv2.bias"
    assert mapping["decoder.up.2.upsample.conv.weight"] == "decoder.up_blocks.0.upsamplers.0.conv.weight"
    assert mapping["encoder.down.1.block.0.nin_shortcut.weight"] == "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
    attn_q = "decoder.mid_block.attentions.0." + ("query.weight" if legacy else "to_q.weight")
    assert mapping["decoder.mid.attn_1.q.weight"] == attn_q
    path = tmp_path / "vae.safetensors"
    ck.write_diffusers(path, ck.state_dict(vae), mapping)
    from safetensors.numpy import load_file

    assert load_file(str(path))[attn_q].ndim == 2  # diffusers stores the 1x1 projections as linear weights
    fresh = AutoencoderKL(TINY.vae)
    ck.load_state(fresh, ck.read_diffusers_vae(path, TINY.vae), source=str(path))
    assert_same_params(vae, fresh)


# ---------------------------------------------------------------- against the real diffusers library (optional)

DIFFUSERS_PYTHON = os.environ.get("PANGUDRAW_DIFFUSERS_PYTHON")


@pytest.mark.skipif(not DIFFUSERS_PYTHON, reason="set PANGUDRAW_DIFFUSERS_PYTHON to a python with torch and diffusers")
def test_real_diffusers_unet_and_vae_give_our_outputs(tmp_path):
    script = str(REPO / "benchmarks" / "diffusers_reference.py")
    cfg = TINY.structure_unet
    config = dict(cfg.model_dump(), time_id_width=TINY.bucket_embed_dim)
    (tmp_path / "unet.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    t = np.array([999, 37], np.int64)
    context = rng.standard_normal((2, 77, cfg.context_dim)).astype(np.float32)
    pooled = rng.standard_normal((2, TINY.text_encoder_2.projection_dim)).astype(np.float32)
    buckets = np.array([[5.0], [2.0]], np.float32)
    np.savez(tmp_path / "in.npz", x=x, timesteps=t, context=context, pooled=pooled, time_ids=buckets)
    subprocess.run([DIFFUSERS_PYTHON, script, "unet-export", str(tmp_path / "unet.json"), str(tmp_path / "u.safetensors"),
                    str(tmp_path / "in.npz"), str(tmp_path / "out.npz")], check=True, timeout=300)
    net = make_unet()
    ck.load_state(net, ck.read_diffusers_unet(tmp_path / "u.safetensors", cfg), source="u")
    y = np.concatenate([pooled, timestep_embedding_np(buckets[:, 0], TINY.bucket_embed_dim)], axis=1)
    ours = net(ms.Tensor(x), ms.Tensor(t.astype(np.int32)), ms.Tensor(context), ms.Tensor(y)).asnumpy()
    theirs = np.load(tmp_path / "out.npz")["eps"]
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * max(1.0, np.abs(theirs).max()))

    (tmp_path / "vae.json").write_text(json.dumps(TINY.vae.model_dump()))
    image = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    z = rng.standard_normal((1, TINY.vae.z_channels, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "vin.npz", image=image, z=z)
    subprocess.run([DIFFUSERS_PYTHON, script, "vae-export", str(tmp_path / "vae.json"), str(tmp_path / "v.safetensors"),
                    str(tmp_path / "vin.npz"), str(tmp_path / "vout.npz")], check=True, timeout=300)
    vae = AutoencoderKL(TINY.vae)
    ck.load_state(vae, ck.read_diffusers_vae(tmp_path / "v.safetensors", TINY.vae), source="v")
    ref = np.load(tmp_path / "vout.npz")
    moments = vae.quant_conv(vae.encoder(ms.Tensor(image))).asnumpy()
    decoded = vae.decoder(vae.post_quant_conv(ms.Tensor(z))).asnumpy()
    np.testing.assert_allclose(moments, ref["moments"], atol=1e-4)
    np.testing.assert_allclose(decoded, ref["decoded"], atol=1e-4)


def test_load_state_fills_a_lazily_initialised_net(unet, eps):
    from mindspore.nn.utils import no_init_parameters

    # How the full-size nets are built: lazy parameters, then the weights straight from the file.
    with no_init_parameters():
        lazy = UNet(TINY.structure_unet)
    lazy.set_train(False)
    ck.load_state(lazy, ck.state_dict(unet), source="memory")
    np.testing.assert_array_equal(lazy(*unet_inputs()).asnumpy(), eps)
