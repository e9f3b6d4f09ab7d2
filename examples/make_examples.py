"""Write the example manifests. Run: python examples/make_examples.py

examples/prompts.parquet   a small manifest for `make demo` (English, Chinese and mixed prompts, several aspect
                           ratios and styles, a pass-through column)
examples/coop.parquet      Coop-Diffusion rows of every mode (latent bridge, control, one-stage super-resolution)
                           beside a plain row, for `pangudraw run examples/coop.parquet`
examples/control/*.png     the control images coop.parquet names (paths relative to the manifest's folder)

The builtin helper models coop.parquet names (`builtin:tiny-sd15`, `builtin:tiny-lowres`, `builtin:tiny-control`)
are the shipped trained helpers (`actors.fusion.builtin_model_dir`; random stand-ins in the user's cache where a
checkout has none).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Prompts in the words the shipped tiny model was trained on (diffusion.synthetic: shapes, palette colours, fill
# patterns, backgrounds) in English, Chinese and mixed text; the aspect ratios it was trained at (1:1, 5:3, 3:5),
# one 16:9 row that snaps to 5:3 and one 512x512 row that snaps to its square bucket; three style controls and a
# negative prompt; each row with three guidance branches, so the demo compiles few graph shapes.
# (row_id, prompt, negative_prompt, aspect, width, height, anime, photography, aesthetic, steps, seed, category)
ROWS = [
    ("en-circle", "a red striped circle on a blue background", "", "1:1", None, None, 0.0, 0.0, 4.0, 20, 1,
     "circle"),
    ("en-star", "a yellow solid star on a purple background", "blurry", "5:3", None, None, 0.0, 3.0, 0.0, 20, 2,
     "star"),
    ("en-square", "a large white checked square on a black background", "", "3:5", None, None, 0.0, 0.0, 4.0,
     20, 3, "square"),
    ("en-triangle", "a green dotted triangle on an orange background", "", "16:9", None, None, 3.0, 0.0, 0.0, 20,
     4, "triangle"),
    ("en-512", "a purple checked star on a white background", "", None, 512, 512, 0.0, 0.0, 4.0, 20, 5, "star"),
    ("zh-circle", "蓝色背景上的红色圆形", "", "1:1", None, None, 0.0, 0.0, 4.0, 20, 6, "circle"),
    ("zh-star", "紫色背景上的黄色纯色星形", "模糊", "5:3", None, None, 0.0, 3.0, 0.0, 20, 7, "star"),
    ("zh-square", "黑色背景上的白色格子正方形", "", "3:5", None, None, 0.0, 0.0, 4.0, 20, 8, "square"),
    ("zh-triangle", "橙色背景上左边的大号绿色圆点三角形", "", "1:1", None, None, 2.0, 0.0, 0.0, 20, 9,
     "triangle"),
    ("mix-circle", "蓝色背景上的 red 条纹圆形", "", "5:3", None, None, 0.0, 0.0, 4.0, 20, 10, "circle"),
    ("mix-star", "a yellow 纯色 star on a 紫色 background", "", "3:5", None, None, 3.0, 0.0, 0.0, 20, 11, "star"),
    ("mix-square", "黑色背景上的 white 格子正方形", "", "1:1", None, None, 0.0, 3.0, 0.0, 20, 12, "square"),
]

COLUMNS = ["row_id", "prompt", "negative_prompt", "aspect", "width", "height", "anime_scale", "photography_scale", "aesthetic_scale",
           "steps", "seed", "category"]
TYPES = [pa.string(), pa.string(), pa.string(), pa.string(), pa.int32(), pa.int32(), pa.float64(), pa.float64(), pa.float64(),
         pa.int32(), pa.int64(), pa.string()]


def build_table() -> pa.Table:
    columns = list(zip(*ROWS))
    return pa.table({name: pa.array(values, type=t) for name, values, t in zip(COLUMNS, columns, TYPES)})


# Coop-Diffusion rows for the default (tiny, 64x64) model, in the synthetic vocabulary it was trained on. Helpers
# (shipped, trained; docs/coop_diffusion.md): `builtin:tiny-sd15` has another latent space (its own f=8 VAE, 8x8
# latents at 64x64, one UNet); `builtin:tiny-lowres` makes 32x32 images in the tiny latent space;
# `builtin:tiny-control` was trained to take a layout image as an input. The control rows give a layout sketch (a
# grey shape on black) that the helper sees; the primary keeps the prompt's colours.
# (row_id, prompt, helper_model, helper_weight, helper_window, control_image_uri, width, height, output_width,
#  output_height, seed, mode)
COOP_ROWS = [
    ("coop-plain", "red striped star, blue background", None, None, None, None, None, None, None, None, 21, "plain"),
    ("bridge-sd15", "red striped star, blue background", "builtin:tiny-sd15", 0.5, "0:1", None, None, None, None,
     None, 21, "latent bridge"),
    ("bridge-sd15-early", "red striped star, blue background", "builtin:tiny-sd15", 0.5, "0:0.5", None, None, None,
     None, None, 21, "latent bridge, early steps"),
    ("control-star-sd15", "red striped star, blue background", "builtin:tiny-sd15", 0.8, "0:0.5",
     "control/star.png", None, None, None, None, 21, "control (SD-1.5-style helper sees a star sketch)"),
    ("control-triangle-lowres", "黄色圆点三角形，紫色背景", "builtin:tiny-lowres", 0.8, "0:0.5",
     "control/triangle.png", None, None, None, None, 22, "control (32x32 helper sees a triangle sketch)"),
    ("control-star-model", "a yellow dotted star on a purple background", "builtin:tiny-control", 0.5, "0:1",
     "control/star.png", None, None, None, None, 23, "control (a model trained to take the sketch as input)"),
    ("sr-lowres", "green checked square, white background", "builtin:tiny-lowres", None, None, None, 32, 32, 64, 64,
     24, "super-resolution 32 -> 64"),
    ("sr-lowres-zh", "橙色纯色圆形，黑色背景", "builtin:tiny-lowres", None, None, None, 32, 32, 64, 64, 25,
     "super-resolution 32 -> 64"),
]
COOP_COLUMNS = ["row_id", "prompt", "helper_model", "helper_weight", "helper_window", "control_image_uri", "width",
                "height", "output_width", "output_height", "seed", "mode"]
COOP_TYPES = [pa.string(), pa.string(), pa.string(), pa.float64(), pa.string(), pa.string(), pa.int32(), pa.int32(),
              pa.int32(), pa.int32(), pa.int64(), pa.string()]
COOP_STEPS = 20


def build_coop_table() -> pa.Table:
    columns = list(zip(*COOP_ROWS))
    table = pa.table({name: pa.array(values, type=t) for name, values, t in zip(COOP_COLUMNS, columns, COOP_TYPES)})
    return table.append_column("steps", pa.array([COOP_STEPS] * len(COOP_ROWS), pa.int32()))


def control_images() -> dict[str, np.ndarray]:
    """Layout sketches, 64x64 RGB: the shape in grey on near-black (`diffusion.evaluation.layout_sketch`)."""
    from diffusion.evaluation import layout_sketch

    return {name: layout_sketch(shape, 64, 64, size="large", position=position)[0]
            for name, shape, position in (("star.png", "star", "center"), ("triangle.png", "triangle", "left"))}


def main() -> None:
    from PIL import Image

    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here.parent))
    out = here / "prompts.parquet"
    pq.write_table(build_table(), out)
    print(f"wrote {out} ({len(ROWS)} rows)")
    (here / "control").mkdir(exist_ok=True)
    for name, pixels in control_images().items():
        Image.fromarray(pixels).save(here / "control" / name, optimize=True)
        print(f"wrote {here / 'control' / name}")
    coop = here / "coop.parquet"
    pq.write_table(build_coop_table(), coop)
    print(f"wrote {coop} ({len(COOP_ROWS)} rows)")

    from actors.fusion import BUILTIN_PREFIX, builtin_model_dir

    for name in sorted({row[2][len(BUILTIN_PREFIX):] for row in COOP_ROWS if row[2]}):
        print(f"helper model {BUILTIN_PREFIX}{name}: {builtin_model_dir(name)}")


if __name__ == "__main__":
    main()
