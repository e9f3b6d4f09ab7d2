"""The synthetic bilingual data set: deterministic for a seed, captions that say what the image shows."""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

from diffusion import synthetic as S


def _rows(n=24, **kw):
    return list(S.generate_rows(S.SyntheticConfig(num_images=n, **kw)))


def _scene(row: dict) -> S.Scene:
    names = [f.name for f in dataclasses.fields(S.Scene)]
    return S.Scene(**{k: row[k] for k in names})


def test_same_seed_same_bytes_other_seed_other_images():
    a, b = _rows(seed=3), _rows(seed=3)
    assert [r["image"] for r in a] == [r["image"] for r in b]
    assert [r["caption"] for r in a] == [r["caption"] for r in b]
    c = _rows(seed=4)
    assert sum(x["image"] != y["image"] for x, y in zip(a, c)) >= 20
    # Row i depends only on (seed, i): a slice gives the same rows as the whole.
    part = list(S.generate_rows(S.SyntheticConfig(num_images=24, seed=3), start=10, stop=14))
    assert [r["image"] for r in part] == [r["image"] for r in a[10:14]]


def test_captions_name_the_attributes_the_image_was_drawn_with():
    for row in _rows(60, seed=5):
        for column in ("caption_en", "caption_zh", "caption_mixed"):
            parsed = S.parse_caption(row[column])
            assert parsed == {k: row[k] for k in ("shape", "colour", "background", "pattern")}, row[column]
        assert any("\u4e00" <= ch <= "\u9fff" for ch in row["caption_zh"])
        assert row["caption_en"].isascii()
        mixed = row["caption_mixed"]
        assert not mixed.isascii() and any(ch.isascii() and ch.isalpha() for ch in mixed)
        assert row["caption"] == row[f"caption_{row['language']}"]


def test_pixels_show_the_caption_colours_shape_and_pattern():
    rows = [r for r in _rows(80, seed=6, low_resolution_fraction=0.0)]
    for row in rows:
        scene = _scene(row)
        image = S.decode_image(row["image"])
        assert image.shape == (scene.height, scene.width, 3)
        # Pixels whose 4x4 supersampled block is entirely inside / outside the shape.
        mask = S.shape_mask(scene).reshape(scene.height, 4, scene.width, 4).mean(axis=(1, 3))
        fill = S.pattern_mask(scene).reshape(scene.height, 4, scene.width, 4).mean(axis=(1, 3))
        bg = np.array(S.COLOUR_BY_NAME[row["background"]].rgb)
        colour = np.array(S.COLOUR_BY_NAME[row["colour"]].rgb)
        outside = image[mask == 0]
        assert len(outside) > 0 and (np.abs(outside.astype(int) - bg).max(axis=1) == 0).all()
        pure_colour = image[(mask == 1) & (fill == 1)]
        assert len(pure_colour) > 0 and (pure_colour == colour).all()
        pure_tint = image[(mask == 1) & (fill == 0)]
        if row["pattern"] == "solid":
            assert len(pure_tint) == 0
        else:
            assert len(pure_tint) > 0 and (pure_tint == np.array(S.tint(row["colour"]))).all()
        # The shape covers about the area its name and size say (square: side^2; circle: pi/4 side^2).
        side = S.SIZES[row["size"]][0] * min(scene.width, scene.height)
        area = {"square": 1.0, "circle": np.pi / 4}.get(row["shape"])
        if area is not None:
            assert mask.sum() == pytest.approx(area * side * side, rel=0.08)


def test_shapes_differ_in_coverage_triangle_half_of_its_box():
    base = S.Scene("square", "red", "blue", "solid", "large", "center", 64, 64, 5, False)
    cover = {s: S.shape_mask(dataclasses.replace(base, shape=s)).mean() for s in S.SHAPES}
    box = (0.75 * 64) ** 2 / 64 ** 2
    assert cover["square"] == pytest.approx(box, rel=0.05)
    assert cover["circle"] == pytest.approx(box * np.pi / 4, rel=0.05)
    assert cover["triangle"] == pytest.approx(box / 2, rel=0.05)
    assert cover["star"] < cover["triangle"]


def test_low_resolution_images_and_buckets():
    rows = _rows(200, seed=7)
    low = [r for r in rows if r["low_resolution"]]
    assert 0.3 < len(low) / len(rows) < 0.5
    sizes = {(r["width"], r["height"]) for r in rows if not r["low_resolution"]}
    assert sizes == {(64, 64), (80, 48), (48, 80)}
    assert {(r["width"], r["height"]) for r in low} == {(32, 32), (40, 24), (24, 40)}


def test_heldout_combinations_stay_out_of_training_sets():
    held = S.heldout_combinations()
    assert len(held) == round(0.1 * len(S.all_combinations()))
    rows = _rows(300, seed=8)
    assert not any((r["shape"], r["colour"], r["background"], r["pattern"]) in held for r in rows)
    assert all(not r["heldout"] for r in rows)
    # Every single value still occurs in training.
    for attr, values in S.ATTRIBUTE_VALUES.items():
        assert {r[attr] for r in rows} == set(values)
    prompts = S.evaluation_prompts(12)
    assert all((p.shape, p.colour, p.background, p.pattern) in held for p in prompts)
    assert {p.language for p in prompts} == {"en", "zh", "mixed"} and {p.aspect_bucket for p in prompts} == {5, 7}
    for p in prompts:
        assert S.parse_caption(p.prompt) == {"shape": p.shape, "colour": p.colour, "background": p.background,
                                             "pattern": p.pattern}


def test_palette_is_the_documented_one():
    assert S.COLOUR_BY_NAME["red"].rgb == (220, 40, 40)
    assert S.COLOUR_BY_NAME["blue"].rgb == (40, 90, 220)
    assert len({c.rgb for c in S.PALETTE}) == len(S.PALETTE) == 8
    assert len({c.zh for c in S.PALETTE}) == 8


def test_parquet_round_trip(tmp_path):
    cfg = S.SyntheticConfig(num_images=30, seed=9)
    path = S.write_parquet(cfg, tmp_path / "d.parquet", row_group_size=8)
    table = pq.read_table(path)
    assert table.num_rows == 30
    assert table.column("image").to_pylist() == [r["image"] for r in S.generate_rows(cfg)]
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="bucket_weights"):
        S.SyntheticConfig(buckets=(5,), bucket_weights=(0.5, 0.5))
    with pytest.raises(ValueError, match="language"):
        S.caption_for("circle", "red", "blue", "solid", "fr")
