"""A synthetic bilingual text-image data set made by code: shapes in colours and fill patterns on coloured backgrounds.

Every image is one scene: a shape (circle, square, triangle, star) of a size (small, medium, large) at a position
(centre, left, right, top, bottom), filled with a colour in a pattern (solid, stripes, dots, checks), on a background
colour. The shape, its size and position are *structure*; the fill pattern is *texture*. Each scene comes with an
English, a Chinese and a mixed-language caption that say exactly what the image shows:

    a large red striped circle on the left on a blue background
    蓝色背景上左边的大号红色条纹圆形
    a large red 条纹 circle on the left on a 蓝色 background

Colours are the fixed named palette `PALETTE` (RGB values below). A patterned fill alternates the colour with its
`tint` (the colour mixed 60% toward white, or 45% toward black for the light colours white and yellow), so the shape
keeps one clear outline. Part of the pool is rendered at half resolution, as a web-scale pool has low-resolution
images. Image sizes are aspect buckets at the model's scale (1/8 of the base buckets: 64x64, 80x48, 48x80).

Everything is deterministic: row i of a data set depends only on (seed, i). Some (shape, colour, background,
pattern) combinations are held out of every training set (`heldout_combinations`), so an evaluation can prompt for
scenes the model has never seen.
"""
from __future__ import annotations

import io
import itertools
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, model_validator

from diffusion import buckets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Colour:
    name: str
    zh: str
    rgb: tuple[int, int, int]


# The palette, with the RGB value every image uses for that name.
PALETTE: tuple[Colour, ...] = (
    Colour("red", "红色", (220, 40, 40)),
    Colour("orange", "橙色", (245, 140, 20)),
    Colour("yellow", "黄色", (245, 215, 40)),
    Colour("green", "绿色", (40, 165, 60)),
    Colour("blue", "蓝色", (40, 90, 220)),
    Colour("purple", "紫色", (140, 60, 190)),
    Colour("white", "白色", (245, 245, 245)),
    Colour("black", "黑色", (25, 25, 25)),
)
COLOURS: tuple[str, ...] = tuple(c.name for c in PALETTE)
COLOUR_BY_NAME: dict[str, Colour] = {c.name: c for c in PALETTE}
LIGHT_COLOURS = frozenset({"white", "yellow"})

SHAPES: dict[str, str] = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形"}
# Pattern name -> (English adjective, Chinese word).
PATTERNS: dict[str, tuple[str, str]] = {
    "solid": ("solid", "纯色"), "stripes": ("striped", "条纹"), "dots": ("dotted", "圆点"), "checks": ("checked", "格子"),
}
# Size name -> (side as a fraction of the image's shorter side, Chinese word).
SIZES: dict[str, tuple[float, str]] = {"small": (0.45, "小号"), "medium": (0.6, "中号"), "large": (0.75, "大号")}
# Position name -> (x anchor, y anchor) in the free space around the shape, English phrase, Chinese word.
POSITIONS: dict[str, tuple[float, float, str, str]] = {
    "center": (0.5, 0.5, "in the centre", "中间"),
    "left": (0.08, 0.5, "on the left", "左边"),
    "right": (0.92, 0.5, "on the right", "右边"),
    "top": (0.5, 0.08, "at the top", "上方"),
    "bottom": (0.5, 0.92, "at the bottom", "下方"),
}
ATTRIBUTES = ("shape", "colour", "background", "pattern")
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "shape": tuple(SHAPES), "colour": COLOURS, "background": COLOURS, "pattern": tuple(PATTERNS),
}
LANGUAGES = ("en", "zh", "mixed")
# Pattern geometry in pixels of a full-resolution (scale 1/8) image; a half-resolution image halves it.
PATTERN_PERIOD = 8.0
SUPERSAMPLE = 4
HELDOUT_SEED = 20240101


def tint(colour: str) -> tuple[int, int, int]:
    """The second colour of a patterned fill: the colour mixed toward white (toward black for light colours)."""
    rgb = np.array(COLOUR_BY_NAME[colour].rgb, dtype=np.float64)
    if colour in LIGHT_COLOURS:
        out = rgb * 0.55
    else:
        out = rgb + (255.0 - rgb) * 0.6
    return tuple(int(round(v)) for v in out)


@dataclass(frozen=True)
class Scene:
    """Everything that decides one image's pixels."""

    shape: str
    colour: str
    background: str
    pattern: str
    size: str
    position: str
    width: int
    height: int
    bucket: int
    low_resolution: bool
    # Jitter of the anchor (fraction of the free space) and phase of the pattern (fraction of a period).
    jitter_x: float = 0.0
    jitter_y: float = 0.0
    phase_x: float = 0.0
    phase_y: float = 0.0

    @property
    def combination(self) -> tuple[str, str, str, str]:
        return (self.shape, self.colour, self.background, self.pattern)

    @property
    def resolution_scale(self) -> float:
        """Pixels of this image per pixel of the full-resolution image it stands for."""
        full_w, full_h = self.full_size
        return self.width / full_w

    @property
    def full_size(self) -> tuple[int, int]:
        return self.width * (2 if self.low_resolution else 1), self.height * (2 if self.low_resolution else 1)

    def shape_box(self) -> tuple[float, float, float]:
        """(left, top, side) of the shape's square bounding box, in pixels of this image."""
        side = SIZES[self.size][0] * min(self.width, self.height)
        ax, ay = POSITIONS[self.position][:2]
        fx = min(max(ax + self.jitter_x, 0.04), 0.96)
        fy = min(max(ay + self.jitter_y, 0.04), 0.96)
        return fx * (self.width - side), fy * (self.height - side), side


class SyntheticConfig(BaseModel):
    """What a generated data set holds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_images: int = Field(6000, ge=1)
    seed: int = 0
    # Bucket ids (SPEC section 3) and how often each appears; the default: portrait, square, landscape.
    buckets: tuple[int, ...] = (3, 5, 7)
    bucket_weights: tuple[float, ...] = (0.25, 0.5, 0.25)
    bucket_scale: float = 0.125
    # Share of images rendered at half resolution (the structure generator's extra data).
    low_resolution_fraction: float = Field(0.4, ge=0.0, le=1.0)
    # Share of (shape, colour, background, pattern) combinations never drawn into a data set.
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    include_heldout: bool = False
    # How often a caption says the size and the position (the image always has both).
    mention_size: float = Field(0.5, ge=0.0, le=1.0)
    mention_position: float = Field(0.5, ge=0.0, le=1.0)
    # Language of the `caption` column: en, zh, mixed.
    language_weights: tuple[float, float, float] = (0.4, 0.4, 0.2)

    @model_validator(mode="after")
    def _check(self) -> "SyntheticConfig":
        if len(self.buckets) != len(self.bucket_weights):
            raise ValueError("bucket_weights needs one weight per bucket")
        for b in self.buckets:
            if not 0 <= b < len(buckets.BASE_BUCKETS):
                raise ValueError(f"bucket {b} is not one of the {len(buckets.BASE_BUCKETS)} buckets")
            w, h = buckets.bucket_sizes(self.bucket_scale)[b]
            if w % 2 or h % 2:
                raise ValueError(f"bucket {b} at scale {self.bucket_scale} is {w}x{h}; sides must be even")
        return self


def all_combinations() -> list[tuple[str, str, str, str]]:
    """Every (shape, colour, background, pattern) with a background different from the colour."""
    return [c for c in itertools.product(SHAPES, COLOURS, COLOURS, PATTERNS) if c[1] != c[2]]


def heldout_combinations(fraction: float = 0.1) -> frozenset[tuple[str, str, str, str]]:
    """A fixed random set of combinations kept out of training (the same for every data set seed).

    At the default 10%, every single attribute value and every pair of values still occurs in training.
    """
    combos = all_combinations()
    rng = np.random.Generator(np.random.PCG64(HELDOUT_SEED))
    order = rng.permutation(len(combos))
    count = int(round(fraction * len(combos)))
    return frozenset(combos[i] for i in order[:count])


def sample_scene(rng: np.random.Generator, config: SyntheticConfig,
                 combos: Sequence[tuple[str, str, str, str]]) -> Scene:
    shape, colour, background, pattern = combos[rng.integers(len(combos))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    weights = np.asarray(config.bucket_weights, dtype=np.float64)
    bucket = config.buckets[rng.choice(len(config.buckets), p=weights / weights.sum())]
    width, height = buckets.bucket_sizes(config.bucket_scale)[bucket]
    low = bool(rng.random() < config.low_resolution_fraction)
    if low:
        width, height = width // 2, height // 2
    jx, jy = rng.uniform(-0.06, 0.06, size=2)
    px, py = rng.random(2)
    return Scene(shape, colour, background, pattern, size, position, width, height, int(bucket), low,
                 float(jx), float(jy), float(px), float(py))


# ---------------------------------------------------------------- rendering


def _shape_polygon(shape: str, left: float, top: float, side: float) -> list[tuple[float, float]] | None:
    cx, cy = left + side / 2, top + side / 2
    if shape == "triangle":
        return [(cx, top), (left + side, top + side), (left, top + side)]
    if shape == "star":
        outer, inner = side / 2, side / 2 * 0.5
        # The star's points span less height than width; centre its vertical extent in the box.
        dy = (outer - outer * math.cos(math.pi / 5)) / 2
        pts = []
        for k in range(10):
            r = outer if k % 2 == 0 else inner
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + dy + r * math.sin(a)))
        return pts
    return None


def shape_mask(scene: Scene, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Boolean (H*s, W*s) mask of the shape at `supersample` times the image's resolution."""
    s = supersample
    left, top, side = (v * s for v in scene.shape_box())
    canvas = Image.new("L", (scene.width * s, scene.height * s), 0)
    draw = ImageDraw.Draw(canvas)
    if scene.shape == "circle":
        draw.ellipse([left, top, left + side, top + side], fill=255)
    elif scene.shape == "square":
        draw.rectangle([left, top, left + side, top + side], fill=255)
    else:
        draw.polygon(_shape_polygon(scene.shape, left, top, side), fill=255)
    return np.asarray(canvas) > 127


def pattern_mask(scene: Scene, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Boolean (H*s, W*s): True where the fill shows its colour, False where it shows the tint."""
    s = supersample
    period = PATTERN_PERIOD * scene.resolution_scale * s
    h, w = scene.height * s, scene.width * s
    y, x = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    u = x / period + scene.phase_x
    v = y / period + scene.phase_y
    if scene.pattern == "solid":
        return np.ones((h, w), dtype=bool)
    if scene.pattern == "stripes":
        return np.floor(v * 2) % 2 == 0
    if scene.pattern == "checks":
        return (np.floor(u * 2) + np.floor(v * 2)) % 2 == 0
    if scene.pattern == "dots":
        du, dv = u - np.floor(u) - 0.5, v - np.floor(v) - 0.5
        return du * du + dv * dv > 0.22**2  # light dots of radius 0.22 periods on the colour
    raise ValueError(f"unknown pattern {scene.pattern!r}")


def render(scene: Scene) -> np.ndarray:
    """The scene as uint8 (H, W, 3): drawn at 4x and box-filtered down, so edges are anti-aliased."""
    shape = shape_mask(scene)
    fill = pattern_mask(scene)
    h, w = shape.shape
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = COLOUR_BY_NAME[scene.background].rgb
    img[shape & fill] = COLOUR_BY_NAME[scene.colour].rgb
    img[shape & ~fill] = tint(scene.colour)
    big = Image.fromarray(img, "RGB")
    return np.asarray(big.resize((scene.width, scene.height), Image.Resampling.BOX))


# ---------------------------------------------------------------- captions


def _words(scene: Scene, lang: str) -> dict[str, str]:
    colour, bg = COLOUR_BY_NAME[scene.colour], COLOUR_BY_NAME[scene.background]
    if lang == "en":
        return {"colour": colour.name, "background": bg.name, "pattern": PATTERNS[scene.pattern][0],
                "shape": scene.shape, "size": scene.size, "position": POSITIONS[scene.position][2]}
    return {"colour": colour.zh, "background": bg.zh, "pattern": PATTERNS[scene.pattern][1],
            "shape": SHAPES[scene.shape], "size": SIZES[scene.size][1], "position": POSITIONS[scene.position][3]}


def _english(w: dict[str, str], size: bool, position: bool, short: bool) -> str:
    if short:
        return f"{w['colour']} {w['pattern']} {w['shape']}, {w['background']} background"
    words = ([w["size"]] if size else []) + [w["colour"], w["pattern"], w["shape"]]
    words.insert(0, _article(words[0]))
    if position:
        words.append(w["position"])
    words += ["on", _article(w["background"]), w["background"], "background"]
    return " ".join(words)


def _article(next_word: str) -> str:
    return "an" if next_word[:1] in "aeiou" else "a"


def _chinese(w: dict[str, str], size: bool, position: bool, short: bool) -> str:
    if short:
        return f"{w['colour']}{w['pattern']}{w['shape']}，{w['background']}背景"
    where = w["position"] if position else ""
    return f"{w['background']}背景上{where}的{w['size'] if size else ''}{w['colour']}{w['pattern']}{w['shape']}"


def captions(scene: Scene, rng: np.random.Generator, config: SyntheticConfig | None = None) -> dict[str, str]:
    """English, Chinese and mixed captions of one scene (the same template choices for all three)."""
    config = config or SyntheticConfig()
    size = bool(rng.random() < config.mention_size)
    position = bool(rng.random() < config.mention_position)
    short = bool(rng.random() < 0.25)
    en, zh = _words(scene, "en"), _words(scene, "zh")
    # Mixed: each attribute word in either language, at least one of each; the sentence frame in either too.
    keys = ["colour", "background", "pattern", "shape"] + (["size"] if size else []) + (["position"] if position else [])
    while True:
        pick_zh = {k: bool(rng.random() < 0.5) for k in keys}
        if any(pick_zh.values()) and not all(pick_zh.values()):
            break
    frame_zh = bool(rng.random() < 0.3)
    # In a Chinese sentence frame, English words keep spaces around them so they stay words.
    mixed_words = {k: (zh[k] if pick_zh.get(k) else (f" {en[k]} " if frame_zh else en[k])) for k in en}
    mixed = (_chinese if frame_zh else _english)(mixed_words, size, position, short)
    mixed = re.sub(r"\s+", " ", mixed).strip()
    return {"en": _english(en, size, position, short), "zh": _chinese(zh, size, position, short), "mixed": mixed}


def caption_for(shape: str, colour: str, background: str, pattern: str, language: str, seed: int = 0) -> str:
    """A caption for given attributes in one language (size and position not mentioned): evaluation prompts."""
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    scene = Scene(shape, colour, background, pattern, "medium", "center", 64, 64, buckets.SQUARE_BUCKET, False)
    cfg = SyntheticConfig(mention_size=0.0, mention_position=0.0)
    return captions(scene, np.random.Generator(np.random.PCG64(seed)), cfg)[language]


_VOCAB: dict[str, tuple[str, str]] = {}
for _c in PALETTE:
    _VOCAB[_c.name] = ("colour", _c.name)
    _VOCAB[_c.zh] = ("colour", _c.name)
for _name, _zh in SHAPES.items():
    _VOCAB[_name] = ("shape", _name)
    _VOCAB[_zh] = ("shape", _name)
for _name, (_en, _zh) in PATTERNS.items():
    _VOCAB[_en] = ("pattern", _name)
    _VOCAB[_zh] = ("pattern", _name)
_WORD_RE = re.compile("|".join(sorted((re.escape(w) for w in _VOCAB), key=len, reverse=True)))
_BACKGROUND_EN = re.compile(r"\b(\w+)\s+background")


def parse_caption(text: str) -> dict[str, str] | None:
    """Read (shape, colour, background, pattern) back from a caption in any of the three forms; None if unclear.

    The background colour is the colour word written right before "background" or "背景"; the other colour word
    is the shape's colour.
    """
    found: dict[str, list[tuple[int, str]]] = {"colour": [], "shape": [], "pattern": []}
    background = None
    for m in _WORD_RE.finditer(text):
        kind, value = _VOCAB[m.group(0)]
        found[kind].append((m.start(), value))
        if kind == "colour" and text[m.end():].lstrip().startswith(("background", "背景")):
            background = (m.start(), value)
    if len(found["shape"]) != 1 or len(found["pattern"]) != 1 or len(found["colour"]) != 2 or background is None:
        return None
    colour = [c for c in found["colour"] if c != background][0][1]
    return {"shape": found["shape"][0][1], "colour": colour, "background": background[1],
            "pattern": found["pattern"][0][1]}


# ---------------------------------------------------------------- data sets


def _row_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index)])))


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Image file bytes -> uint8 (H, W, 3)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def generate_rows(config: SyntheticConfig, start: int = 0, stop: int | None = None) -> Iterator[dict]:
    """Rows start..stop of the data set: image (PNG bytes), captions, and the attributes the image was drawn from."""
    heldout = heldout_combinations(config.heldout_fraction)
    combos = [c for c in all_combinations() if config.include_heldout or c not in heldout]
    stop = config.num_images if stop is None else min(stop, config.num_images)
    lang_p = np.asarray(config.language_weights, dtype=np.float64)
    for index in range(start, stop):
        rng = _row_rng(config.seed, index)
        scene = sample_scene(rng, config, combos)
        caps = captions(scene, rng, config)
        language = LANGUAGES[rng.choice(3, p=lang_p / lang_p.sum())]
        row = {
            "index": index,
            "image": encode_png(render(scene)),
            "caption": caps[language],
            "language": language,
            "caption_en": caps["en"],
            "caption_zh": caps["zh"],
            "caption_mixed": caps["mixed"],
        }
        row.update({k: v for k, v in asdict(scene).items()})
        row["heldout"] = scene.combination in heldout
        yield row


def write_parquet(config: SyntheticConfig, path: str | Path, *, row_group_size: int = 1000) -> Path:
    """Generate the data set into one Parquet file (rows in index order); returns the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = None
    try:
        for start in range(0, config.num_images, row_group_size):
            rows = list(generate_rows(config, start, start + row_group_size))
            table = pa.Table.from_pylist(rows)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    tmp.replace(path)
    log.info("wrote %d synthetic images to %s", config.num_images, path)
    return path


def text_corpus() -> list[str]:
    """Every word the captions can use in every template, plus the style triggers: the tokenizers' training text."""
    from diffusion.guidance import STYLE_TRIGGERS

    texts = []
    rng = np.random.Generator(np.random.PCG64(7))
    cfg = SyntheticConfig(mention_size=1.0, mention_position=1.0)
    for shape, colour, background, pattern in all_combinations():
        for size, position in zip(SIZES, POSITIONS):
            scene = Scene(shape, colour, background, pattern, size, position, 64, 64, 5, False)
            caps = captions(scene, rng, cfg)
            texts.extend(caps.values())
    texts.extend(t.strip() for t in STYLE_TRIGGERS.values())
    return texts


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt with the attributes its image should show."""

    prompt: str
    language: str
    shape: str
    colour: str
    background: str
    pattern: str
    aspect_bucket: int
    seed: int


def evaluation_prompts(count: int, *, heldout: bool = True, languages: Sequence[str] = LANGUAGES,
                       aspect_buckets: Sequence[int] = (5, 7), seed: int = 1234) -> list[EvalPrompt]:
    """`count` prompts cycling through languages and aspect buckets; combinations from the held-out set by default."""
    held = heldout_combinations()
    pool = sorted(held) if heldout else [c for c in all_combinations() if c not in held]
    rng = np.random.Generator(np.random.PCG64(seed))
    order = rng.permutation(len(pool))
    out = []
    for i in range(count):
        shape, colour, background, pattern = pool[order[i % len(pool)]]
        language = languages[i % len(languages)]
        bucket = aspect_buckets[(i // len(languages)) % len(aspect_buckets)]
        out.append(EvalPrompt(caption_for(shape, colour, background, pattern, language, seed=seed + i), language,
                              shape, colour, background, pattern, int(bucket), seed + i))
    return out
