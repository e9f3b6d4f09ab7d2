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

# Four aspect ratios (one row asks for 512x512, which the tiny model snaps to its square bucket) and three styles,
# each row with three guidance branches, so the demo compiles few graph shapes.
# (row_id, prompt, negative_prompt, aspect, width, height, anime, photography, aesthetic, steps, seed, category)
ROWS = [
    ("en-cat", "a cat sleeping on a sofa, soft morning light", "", "1:1", None, None, 0.0, 0.0, 4.0, 20, 1,
     "animals"),
    ("en-lake", "a photo of a mountain lake at sunrise", "blurry, low quality", "16:9", None, None, 0.0, 3.0, 0.0,
     20, 2, "landscape"),
    ("en-house", "a small blue house with a red door", "", "4:3", None, None, 0.0, 0.0, 4.0, 20, 3, "architecture"),
    ("en-girl", "anime style girl with long hair, cherry blossoms", "", "9:16", None, None, 4.0, 0.0, 0.0, 20, 4,
     "people"),
    ("en-star", "a purple checked star on a white background", "", None, 512, 512, 0.0, 0.0, 4.0, 20, 5, "shapes"),
    ("zh-shanshui", "山水画，远山，薄雾，小船", "", "16:9", None, None, 0.0, 0.0, 4.0, 20, 6, "landscape"),
    ("zh-cat", "一只橘猫坐在窗台上", "模糊", "1:1", None, None, 0.0, 3.0, 0.0, 20, 7, "animals"),
    ("zh-circle", "蓝色背景上的红色圆形", "", "4:3", None, None, 0.0, 0.0, 4.0, 20, 8, "shapes"),
    ("zh-city", "夜晚的城市街道，霓虹灯", "", "9:16", None, None, 0.0, 2.0, 0.0, 20, 9, "city"),
    ("mix-house", "山水画 landscape painting with a small house, 小房子", "", "16:9", None, None, 0.0, 0.0, 4.0, 20,
     10, "landscape"),
    ("mix-girl", "一个女孩 a girl in a red dress, anime style", "", "9:16", None, None, 3.0, 0.0, 0.0, 20, 11,
     "people"),
    ("mix-tea", "一杯绿茶 a cup of green tea on a wooden table, 摄影", "", "4:3", None, None, 0.0, 3.0, 0.0, 20, 12,
     "food"),
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
