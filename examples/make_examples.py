"""Write the example manifests. Run: python examples/make_examples.py

examples/prompts.parquet   a small manifest for `make demo` (English, Chinese and mixed prompts, several aspect
                           ratios and styles, a pass-through column)
examples/coop.parquet      Coop-Diffusion rows of every mode (latent bridge, control, one-stage super-resolution)
                           beside a plain row, for `pangudraw run examples/coop.parquet`
examples/control/*.png     the control images coop.parquet names (paths relative to the manifest's folder)

The builtin helper models coop.parquet names (`builtin:tiny-sd15`, `builtin:tiny-lowres`) are prepared too: random
tiny ones in the user's cache until trained ones are shipped (`actors.fusion.builtin_model_dir`).
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


# Coop-Diffusion rows for the default (tiny, 64x64) model. Helpers: `builtin:tiny-sd15` has another latent space
# (f=8 VAE, latent scale 0.18215, one UNet); `builtin:tiny-lowres` makes 32x32 images in the tiny latent space.
# (row_id, prompt, helper_model, helper_weight, helper_window, control_image_uri, width, height, output_width,
#  output_height, seed, mode)
COOP_ROWS = [
    ("coop-plain", "a red circle on a blue background", None, None, None, None, None, None, None, None, 21, "plain"),
    ("bridge-sd15", "a red circle on a blue background", "builtin:tiny-sd15", 0.5, "0:1", None, None, None, None,
     None, 21, "latent bridge"),
    ("bridge-sd15-early", "a red circle on a blue background", "builtin:tiny-sd15", 0.5, "0:0.5", None, None, None,
     None, None, 21, "latent bridge, early steps"),
    ("control-disc-lowres", "a red circle on a blue background", "builtin:tiny-lowres", 0.5, "0:0.6",
     "control/disc.png", None, None, None, None, 22, "control (32x32 helper sees a disc)"),
    ("control-bars-sd15", "蓝色背景上的红色圆形", "builtin:tiny-sd15", 0.4, "0:0.5", "control/bars.png", None, None,
     None, None, 23, "control (SD-1.5-style helper sees bars)"),
    ("sr-lowres", "a small blue house with a red door", "builtin:tiny-lowres", None, None, None, 32, 32, 64, 64, 24,
     "super-resolution 32 -> 64"),
    ("sr-lowres-zh", "山水画 landscape painting", "builtin:tiny-lowres", None, None, None, 32, 32, 64, 64, 25,
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
    """Layout sketches, 64x64 RGB: a disc (an object's place) and two vertical bars (an edge map)."""
    yy, xx = np.mgrid[:64, :64]
    disc = np.full((64, 64, 3), 24, np.uint8)
    disc[(yy - 30) ** 2 + (xx - 34) ** 2 < 18 ** 2] = (230, 40, 40)
    bars = np.full((64, 64, 3), 235, np.uint8)
    bars[:, 10:18] = bars[:, 42:50] = (20, 20, 200)
    return {"disc.png": disc, "bars.png": bars}


def main() -> None:
    from PIL import Image

    here = Path(__file__).resolve().parent
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

    sys.path.insert(0, str(here.parent))
    from actors.fusion import BUILTIN_PREFIX, builtin_model_dir

    for name in sorted({row[2][len(BUILTIN_PREFIX):] for row in COOP_ROWS if row[2]}):
        print(f"helper model {BUILTIN_PREFIX}{name}: {builtin_model_dir(name)}")


if __name__ == "__main__":
    main()
