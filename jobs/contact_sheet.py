"""A contact sheet: the job's first images in a grid with their prompts, as PNG and as HTML beside the results.

The HTML page shows every prompt as written (any script); the PNG is for a glance without a browser and draws the
prompt: Latin text in Pillow's own font, CJK characters in the first installed font of `_CJK_FONTS` (none
installed: they show as boxes).
"""
from __future__ import annotations

import html
import io
import logging
import math
import re
from pathlib import Path

import pyarrow as pa

from storage import NotFound, Store

log = logging.getLogger(__name__)

_CJK_FONTS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",  # Debian/Ubuntu fonts-droid-fallback
    "/System/Library/Fonts/PingFang.ttc",
    "C:/Windows/Fonts/msyh.ttc",
)


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def first_images(results: pa.Table, limit: int) -> list[dict]:
    """The ok records to show: in natural order of row id, then image index."""
    ok = [r for r in results.select(["row_id", "image_index", "status", "image_key", "prompt", "width", "height"])
          .to_pylist() if r["status"] == "ok" and r["image_key"]]
    ok.sort(key=lambda r: (_natural(r["row_id"]), r["image_index"]))
    return ok[:limit]


def _cjk_font(size: int):
    """The first installed font of `_CJK_FONTS`, or None."""
    from PIL import ImageFont

    for path in _CJK_FONTS:
        if Path(path).is_file():
            try:
                return ImageFont.truetype(path, size)
            except OSError:
                continue
    return None


def _is_wide(ch: str) -> bool:
    """CJK ideographs, kana, hangul and full-width forms: the characters Pillow's own font has no glyphs for."""
    return ord(ch) >= 0x2E80


class _CaptionFonts:
    """Pillow's own font for Latin text, a CJK font (when one is installed) for CJK characters, run by run."""

    def __init__(self, size: int):
        from PIL import ImageFont

        self.latin = ImageFont.load_default(size=size)
        self.cjk = _cjk_font(size)

    def runs(self, text: str) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        for ch in text:
            font = self.cjk if self.cjk is not None and _is_wide(ch) else self.latin
            if out and out[-1][1] is font:
                out[-1] = (out[-1][0] + ch, font)
            else:
                out.append((ch, font))
        return out

    def width(self, text: str) -> float:
        return sum(font.getlength(run) for run, font in self.runs(text))

    def draw(self, draw, xy: tuple[float, float], text: str, fill: str) -> None:
        x, y = xy
        for run, font in self.runs(text):
            draw.text((x, y), run, fill=fill, font=font)
            x += font.getlength(run)


def _wrap(text: str, fits, lines: int) -> list[str]:
    """Up to `lines` lines of `text`, each as long as `fits(line)` allows; an ellipsis ends a cut text."""
    out, rest = [], text.replace("\n", " ")
    while rest and len(out) < lines:
        n = 1
        while n < len(rest) and fits(rest[:n + 1]):
            n += 1
        out.append(rest[:n])
        rest = rest[n:].lstrip(" ") if len(out) < lines else rest[n:]
    if rest and out:
        out[-1] = out[-1][:-1] + "…"
    return out


def render_png(images: list[tuple[dict, bytes]], *, thumb: int = 160, columns: int = 4) -> bytes:
    """A grid of thumbnails (long side `thumb`), each with its row id and the start of its prompt."""
    from PIL import Image, ImageDraw

    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    caption_h, pad = 48, 8
    cell_w, cell_h = thumb + 2 * pad, thumb + caption_h + 2 * pad
    sheet = Image.new("RGB", (columns * cell_w, max(rows, 1) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    fonts = _CaptionFonts(11)
    for i, (record, data) in enumerate(images):
        x, y = (i % columns) * cell_w + pad, (i // columns) * cell_h + pad
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            scale = thumb / max(image.width, image.height)
            # Small images are enlarged with hard pixel edges, so what is seen is what was generated.
            resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
            sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        caption = [f"{record['row_id']} #{record['image_index']}" if record["image_index"] else record["row_id"]]
        caption += _wrap(record.get("prompt") or "", lambda line: fonts.width(line) <= cell_w - pad, 2)
        for line_no, line in enumerate(caption):
            fonts.draw(draw, (x, y + thumb + 2 + 14 * line_no), line, fill="black")
    out = io.BytesIO()
    sheet.save(out, format="PNG")
    return out.getvalue()


def render_html(records: list[dict], title: str) -> str:
    """A page of the same images (linked by their keys, relative to the output root) with the full prompts."""
    cells = []
    for r in records:
        cells.append(
            f'<figure><img src="{html.escape(r["image_key"])}" width="{r["width"]}" height="{r["height"]}" '
            f'loading="lazy"><figcaption><b>{html.escape(r["row_id"])}</b> #{r["image_index"]}<br>'
            f'{html.escape(r.get("prompt") or "")}</figcaption></figure>'
        )
    return (
        "<!doctype html><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:sans-serif}figure{display:inline-block;width:220px;vertical-align:top;margin:6px}"
        "img{max-width:200px;height:auto;image-rendering:pixelated}figcaption{font-size:12px}</style>"
        f"<h1>{html.escape(title)}</h1>" + "".join(cells) + "\n"
    )


def write_contact_sheet(store: Store, results: pa.Table | None, *, title: str, limit: int = 16) -> list[str]:
    """Write contact_sheet.png and contact_sheet.html under the output root; returns their keys (none without images)."""
    from jobs.results import CONTACT_SHEET_HTML, CONTACT_SHEET_PNG

    if results is None or results.num_rows == 0:
        return []
    images = []
    for record in first_images(results, limit):
        try:
            images.append((record, store.get(record["image_key"])))
        except NotFound:
            log.warning("contact sheet: %s is listed as ok but missing", store.uri_for(record["image_key"]))
    if not images:
        return []
    store.put(CONTACT_SHEET_PNG, render_png(images), "image/png")
    store.put(CONTACT_SHEET_HTML, render_html([r for r, _ in images], title).encode("utf-8"), "text/html")
    return [CONTACT_SHEET_PNG, CONTACT_SHEET_HTML]
