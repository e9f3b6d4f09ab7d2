"""Write examples/prompts.parquet: a small manifest for `make demo` (English, Chinese and mixed prompts,
several aspect ratios and styles, a pass-through column). Run: python examples/make_examples.py"""
from __future__ import annotations

from pathlib import Path

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


def main() -> None:
    out = Path(__file__).resolve().parent / "prompts.parquet"
    pq.write_table(build_table(), out)
    print(f"wrote {out} ({len(ROWS)} rows)")


if __name__ == "__main__":
    main()
