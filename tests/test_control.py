"""Image control: layout maps, a control model's extra input channel, its training, and Coop-Diffusion with it."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from diffusion import control, coop, evaluation, runtime, synthetic
from diffusion.config import ModelConfig, tiny_config, tiny_control_config
from diffusion.model import GenerationRequest, PanGuDraw
from diffusion.tiny import build_random_model
from diffusion.training import DiffusionTrainConfig, DiffusionTrainer, ImageTextSet, OptimConfig

runtime.configure("cpu")


def test_a_layout_map_marks_the_sketched_cells():
    sketch, mask = evaluation.layout_sketch("square", 64, 64, size="large", position="left")
    cmap = control.layout_map(sketch, (8, 8))
    assert cmap.shape == (1, 8, 8) and cmap.dtype == np.float32
    share = mask.reshape(8, 8, 8, 8).mean(axis=(1, 3))
    np.testing.assert_allclose(cmap[0], 2 * share - 1, atol=0.05)
    assert cmap[0, 4, 1] == 1.0 and cmap[0, 4, 7] == -1.0  # inside the left square / the empty right side
    # A picture gives its foreground: the synthetic scene's shape on its plain background.
    scene = synthetic.Scene("circle", "red", "blue", "stripes", "large", "center", 64, 64, 5, False)
    img = synthetic.render(scene)
    picture = control.layout_map(img, (16, 16))
    assert picture[0, 8, 8] > 0.9 and picture[0, 0, 0] == -1.0
    # Any image size: a 48x80 sketch onto a 16x16 grid by area.
    odd, _ = evaluation.layout_sketch("circle", 80, 48, size="large", position="center")
    assert control.layout_map(odd, (16, 16)).shape == (1, 16, 16)
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) image"):
        control.layout_map(np.zeros((8, 8), np.uint8), (2, 2))


def test_a_control_model_needs_the_extra_input_channel():
    cfg = tiny_control_config()
    assert cfg.control_channels == 1 and cfg.structure_unet.in_channels == 5 and cfg.vae.downsample_factor == 8
    bad = cfg.model_dump()
    bad["control_channels"] = 2
    with pytest.raises(ValueError, match=r"in_channels 5 != vae.embed_dim 4 \+ control_channels 2"):
        ModelConfig.model_validate(bad)


@pytest.fixture(scope="module")
def control_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("ctl") / "model", config=tiny_control_config("ctl"), seed=3)


def _req(seed=5, **kw):
    return GenerationRequest(prompt="a red circle", seed=seed, width=64, height=64, steps=4, **kw)


def test_the_control_map_reaches_the_unet(control_dir, tiny_model_dir):
    model = PanGuDraw.load(control_dir)
    left, _ = evaluation.layout_sketch("square", 64, 64, size="large", position="left")
    right, _ = evaluation.layout_sketch("square", 64, 64, size="large", position="right")
    reqs = [_req(), _req()]
    conds = model.encode(reqs, [left, None])
    assert conds[0].control.shape == (1, 8, 8) and conds[1].control is None
    a = model.sample(reqs, conds)
    b = model.sample(reqs, model.encode(reqs, [right, None]))
    c = model.sample(reqs, model.encode(reqs))
    assert not np.allclose(a[0], b[0])  # another map, another image
    np.testing.assert_array_equal(a[1], b[1])  # the row without a map is untouched
    np.testing.assert_array_equal(a[1], c[1])  # and equals "no control images at all" (the all-zero map)
    zeros = model.with_control(reqs[:1], model.encode(reqs[:1]), [np.full((64, 64, 3), 20, np.uint8)])
    assert np.all(zeros[0].control == -1.0)  # a blank image: no foreground anywhere
    text_only = PanGuDraw.load(tiny_model_dir)
    with pytest.raises(ValueError, match="takes no control image"):
        text_only.encode([_req()], [left])
    with pytest.raises(ValueError, match="1 control images for 2 rows"):
        model.encode(reqs, [left])
    with pytest.raises(ValueError, match="must be uint8"):
        model.encode([_req()], [left.astype(np.float32)])


@pytest.fixture(scope="module")
def data():
    rows = list(synthetic.generate_rows(synthetic.SyntheticConfig(num_images=24, seed=5, low_resolution_fraction=0.0)))
    return ImageTextSet.from_table(pa.Table.from_pylist(rows))


def test_the_trainer_feeds_each_image_its_own_layout(control_dir, data, tmp_path):
    model = PanGuDraw.load(control_dir, batch_invariant=False)
    cfg = DiffusionTrainConfig(mode="monolithic", steps=6, batch_size=4, checkpoint_every=3, log_every=3,
                               control_dropout=0.25, train_text_encoders=False,
                               optim=OptimConfig(learning_rate=2e-3, warmup_steps=1))
    trainer = DiffusionTrainer(model, data, cfg, tmp_path / "run")
    dropped = kept = 0
    for k in range(12):
        batch = trainer.make_batch(k)
        x0, cmap = batch.inputs[0], batch.inputs[-1]
        assert cmap.shape == (x0.shape[0], 1, *x0.shape[2:])
        _, members = trainer.order.batch(k)
        for row, m in zip(cmap, members):
            image = trainer.bucketed.images[trainer.order.batch(k)[0]][m]
            if np.all(row == 0):
                dropped += 1
            else:
                kept += 1
                np.testing.assert_array_equal(row, control.layout_map(image, x0.shape[2:]))
    assert kept > 0 and 0.1 <= dropped / (dropped + kept) <= 0.45, (dropped, kept)
    rows = trainer.train()
    assert [r["step"] for r in rows] == [3, 6] and all(np.isfinite(r["loss"]) for r in rows)


def test_a_plain_model_rejects_control_maps(tiny_model_dir):
    model = PanGuDraw.load(tiny_model_dir)
    req = _req()
    cond = model.encode([req])[0]
    cond.control = np.zeros((1, 16, 16), np.float32)
    with pytest.raises(ValueError, match="takes no control image"):
        model.sample([req], [cond])


def test_coop_hands_a_control_model_its_image_as_input(control_dir, tiny_model_dir):
    primary = PanGuDraw.load(tiny_model_dir)
    helper_model = PanGuDraw.load(control_dir)
    sketch, _ = evaluation.layout_sketch("star", 64, 64, size="large", position="center")
    reqs = [_req(seed=1), _req(seed=2)]
    fusion = coop.CoopFusion(primary, reqs, [coop.CoopHelper(helper_model, weight=0.5, window=(0.0, 0.5),
                                                             control_image=sketch)])
    link = fusion.links[0]
    assert link.control_input and link.control_latent is None and link.keeps_chain
    assert all(np.array_equal(c.control, control.layout_map(sketch, (8, 8))) for c in link.conds)
    out = fusion.sample(primary.encode(reqs))
    assert out.shape == (2, 4, 16, 16) and np.all(np.isfinite(out))
    rec = fusion.record()[0]
    assert rec["control"] is True and rec["control_mode"] == "input" and rec["steps"] == [0, 1]
    # Without an image the control model still joins, with the all-zero map: a different fused result.
    plain = coop.CoopFusion(primary, reqs, [coop.CoopHelper(helper_model, weight=0.5, window=(0.0, 0.5))])
    assert plain.record()[0]["control_mode"] is None
    assert not np.allclose(plain.sample(primary.encode(reqs)), out)
    assert tiny_config().control_channels == 0
