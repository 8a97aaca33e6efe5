"""Draws synthetic site photos from :class:`~bbuqc_lightning.data.synthetic.scenes.ImageScene` data.

Why: Stage-A needs images whose content *is* their reference summary. Every drawing here is read
off the scene objects, and each defect the rules care about is visible: loose screws are offset
with a red ring, rusty ones brown, exposed copper orange, doubled lugs stacked; tight fibre bends
are kinks; sleeves are striped (蛇形管) or thick grey (铠装); unreadable labels are smudged; an
upside-down baffle's arrow points down; scattered wires cross. Partial views are cut off by a dark
band, and the uncertainty remarks blur (模糊), occlude (遮挡) or darken (无法判断) the photo.
Everything comes from a ``random.Random`` seeded per image: no global random state.

:func:`write_synthetic_tree` (in :mod:`bbuqc_lightning.data.synthetic.tree`) saves
the photos in the SPEC §3 tree, with the naming quirks of field data, next to the Stage-A JSONL.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

from PIL import Image, ImageDraw, ImageFilter, ImageFont

from bbuqc_lightning.data.synthetic.scenes import (
    ImageScene,
    SceneObject,
    Vocab,
)

Box = tuple[int, int, int, int]
Draw = ImageDraw.ImageDraw
_DEFAULT_SIZE = (320, 240)
_MIN_DRAW = (240, 180)  # smaller images are drawn at a multiple of their size, then downscaled


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, size))


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int = 12) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)
    return (r, g, b)


def _cells(box: Box, n: int, horizontal: bool = True) -> list[Box]:
    """Splits a box into ``n`` equal cells (for ``×N`` repeated objects)."""
    x0, y0, x1, y1 = box
    if horizontal:
        w = (x1 - x0) / n
        return [(round(x0 + i * w), y0, round(x0 + (i + 1) * w), y1) for i in range(n)]
    h = (y1 - y0) / n
    return [(x0, round(y0 + i * h), x1, round(y0 + (i + 1) * h)) for i in range(n)]


def _shrink(box: Box, frac: float) -> Box:
    x0, y0, x1, y1 = box
    dx, dy = round((x1 - x0) * frac), round((y1 - y0) * frac)
    return (x0 + dx, y0 + dy, x1 - dx, y1 - dy)


def _screw(d: Draw, cx: int, cy: int, r: int, defect: str | None, rng: random.Random) -> None:
    """A screw head; the defect decides how it looks (compliant = centred silver head with a cross)."""
    if defect == "未拧紧":
        cx, cy = cx + r // 2, cy - r // 2
        d.ellipse((cx - r - 2, cy - r - 2, cx + r + 2, cy + r + 2), outline=(220, 30, 30), width=2)
    if defect == "复接":
        d.ellipse((cx - r - 3, cy - r + 2, cx + r - 3, cy + r + 2), fill=(200, 200, 60), outline=(60, 60, 60))
    if defect == "露铜":
        d.rectangle((cx - r, cy + r, cx + r, cy + 2 * r), fill=(205, 110, 40))
    fill = _jitter(rng, (120, 70, 30), 10) if defect == "生锈" else _jitter(rng, (200, 200, 205), 8)
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=(40, 40, 40))
    d.line((cx - r // 2, cy, cx + r // 2, cy), fill=(50, 50, 50), width=1)
    d.line((cx, cy - r // 2, cx, cy + r // 2), fill=(50, 50, 50), width=1)
    if defect == "生锈":
        for _ in range(3):
            px, py = cx + rng.randint(-r, r), cy + rng.randint(-r, r)
            d.ellipse((px - 2, py - 2, px + 2, py + 2), fill=(90, 45, 15))


def _draw_bbu(d: Draw, box: Box, obj: SceneObject, rng: random.Random) -> None:
    """A 19-inch unit with ports, LEDs and the brand; a dashed empty bay when a baffle is needed."""
    x0, y0, x1, y1 = box
    unit = (x0, y0, x1, y0 + (y1 - y0) * 3 // 5)
    d.rectangle(unit, fill=_jitter(rng, (185, 188, 192)), outline=(60, 60, 60), width=2)
    brand = Vocab.BRANDS.get(obj.attrs[0], obj.attrs[0])
    d.text((x0 + 5, unit[1] + 4), brand, fill=(180, 20, 20), font=_font((y1 - y0) // 7))
    for i, cell in enumerate(_cells(_shrink((x0, unit[3] - 14, x1, unit[3] - 4), 0.05), 6)):
        d.rectangle(_shrink(cell, 0.2), fill=(30, 30, 30))
        if i < 3:
            d.ellipse((cell[0] + 2, unit[1] + 4, cell[0] + 6, unit[1] + 8), fill=(40, 200, 60))
    if obj.has(Vocab.NEED):
        bay = (x0, unit[3] + 3, x1, y1)
        if obj.has(Vocab.FITTED):
            d.rectangle(bay, fill=(40, 60, 120), outline=(20, 20, 20))
        else:
            for x in range(bay[0], bay[2], 8):
                d.line((x, bay[1], min(x + 4, bay[2]), bay[1]), fill=(230, 230, 230))
                d.line((x, bay[3], min(x + 4, bay[2]), bay[3]), fill=(230, 230, 230))


def _draw_baffle(d: Draw, box: Box, obj: SceneObject, rng: random.Random) -> None:
    """A vented plate whose arrow points up when fitted the right way, down when upside down."""
    x0, y0, x1, y1 = _shrink(box, 0.08)
    d.rectangle((x0, y0, x1, y1), fill=_jitter(rng, (45, 65, 125)), outline=(15, 15, 30), width=2)
    for y in range(y0 + 6, y1 - 4, 7):
        d.line((x0 + 8, y, (x0 + x1) // 2 - 12, y), fill=(20, 30, 60), width=2)
    cx, h = x0 + (x1 - x0) * 3 // 4, (y1 - y0) // 3
    cy = (y0 + y1) // 2
    tip, base = (cy - h, cy + h) if obj.has(Vocab.DIR_OK) else (cy + h, cy - h)
    d.line((cx, base, cx, tip), fill=(255, 255, 255), width=max(3, h // 8))
    sign = 1 if tip < base else -1
    head = max(5, h // 3)
    d.polygon(
        [(cx, tip), (cx - head, tip + head * sign), (cx + head, tip + head * sign)], fill=(255, 255, 255)
    )


def _draw_part(d: Draw, box: Box, obj: SceneObject, rng: random.Random) -> None:
    """Screws on a bracket / ground bar / cabinet frame, or connectors on a port panel, ×N."""
    name, defect = obj.attrs[0], (obj.conditional[0] if obj.has(Vocab.NOT_OK) and obj.conditional else None)
    x0, y0, x1, y1 = _shrink(box, 0.06)
    cy, u = (y0 + y1) // 2, max(3, min((x1 - x0) // (obj.count * 4), (y1 - y0) // 10))  # u: size unit
    if name in (Vocab.BBU_PLUG, Vocab.ODF_PLUG):
        panel = (120, 125, 130) if name == Vocab.BBU_PLUG else (225, 225, 215)
        d.rectangle((x0, y0, x1, cy), fill=_jitter(rng, panel), outline=(40, 40, 40))
        d.text(
            (x0 + 3, y0 + 2), "BBU" if name == Vocab.BBU_PLUG else "ODF", fill=(0, 0, 0), font=_font(2 * u)
        )
        for cell in _cells((x0, cy - 3 * u, x1, cy), obj.count):
            cx, gap = (cell[0] + cell[2]) // 2, (u if defect == "未拧紧" else 0)
            d.rectangle(
                (cx - u, cy - 2 * u + gap, cx + u, cy + u + gap), fill=(40, 110, 210), outline=(0, 0, 0)
            )
            if defect == "未拧紧":
                d.rectangle((cx - u - 2, cy - 2 * u - 2, cx + u + 2, cy - 2 * u + 1), fill=(220, 30, 30))
            elif defect:
                _screw(d, cx, cy + 2 * u, u, defect, rng)
            d.line((cx, cy + u + gap, cx + rng.randint(-u, u), y1), fill=(240, 200, 20), width=max(2, u // 2))
        return
    plate = {Vocab.BAR_SCREW: (190, 120, 60), Vocab.CABINET_SCREW: (90, 95, 100)}.get(name, (160, 165, 170))
    d.rectangle((x0, cy - 2 * u, x1, cy + 2 * u), fill=_jitter(rng, plate), outline=(30, 30, 30))
    grounding = name in (Vocab.BAR_SCREW, Vocab.CABINET_SCREW)
    for cell in _cells((x0, cy, x1, cy), obj.count):
        cx = (cell[0] + cell[2]) // 2
        if grounding:  # yellow-green earth wire to each lug
            for k, colour in enumerate(((230, 210, 30), (40, 160, 60))):
                d.line(
                    (cx - u // 2 + k * u, cy, cx + k * u + rng.randint(-u, u), y1),
                    fill=colour,
                    width=max(2, u // 2),
                )
        _screw(d, cx, cy, u + u // 2, defect, rng)


def _fibre_path(box: Box, tight: bool) -> list[tuple[float, float]]:
    """Down, a 90° bend, then right; a reasonable bend is a wide arc, an unreasonable one a kink."""
    x0, y0, x1, y1 = box
    r = 3.0 if tight else min(x1 - x0, y1 - y0) * 0.45
    cx, cy = x0 + r, y1 - r
    arc = [
        (cx - r * math.cos(t / 10 * math.pi / 2), cy + r * math.sin(t / 10 * math.pi / 2)) for t in range(11)
    ]
    return [(x0, y0), *arc, (x1, y1)]


def _draw_fibre(d: Draw, box: Box, obj: SceneObject, rng: random.Random) -> None:
    """N fibres; 蛇形管 = thick black with stripes, 铠装 = thick steel grey, unprotected = thin yellow."""
    for i, cell in enumerate(_cells(_shrink(box, 0.08), obj.count)):
        path = _fibre_path((cell[0] + 4, cell[1], cell[2], cell[3] - i * 2), obj.has(Vocab.RADIUS_BAD))
        if obj.has(Vocab.UNPROTECTED):
            d.line(path, fill=_jitter(rng, (245, 205, 30)), width=2, joint="curve")
        elif obj.has("铠装"):
            d.line(path, fill=_jitter(rng, (140, 145, 150)), width=7, joint="curve")
            d.line(path, fill=(90, 90, 95), width=1)
        else:
            d.line(path, fill=(20, 20, 20), width=8, joint="curve")
            for (ax, ay), (bx, by) in itertools.pairwise(path):
                mx, my, ang = (ax + bx) / 2, (ay + by) / 2, math.atan2(by - ay, bx - ax) + math.pi / 2
                dx, dy = 4 * math.cos(ang), 4 * math.sin(ang)
                d.line((mx - dx, my - dy, mx + dx, my + dy), fill=(110, 110, 110), width=1)


def _draw_wire(d: Draw, box: Box, obj: SceneObject, rng: random.Random) -> None:
    """Wire bundles: tidy = parallel runs with white ties, scattered = crossing random polylines."""
    x0, y0, x1, y1 = _shrink(box, 0.08)
    n = obj.count * 3
    colours = [_jitter(rng, c) for c in ((230, 210, 30), (40, 160, 60), (30, 30, 30))]
    if obj.has(Vocab.TIDY):
        xs = [x0 + (x1 - x0) // 3 + k * 4 for k in range(n)]
        for k, x in enumerate(xs):
            d.line((x, y0, x, y1), fill=colours[k % 3], width=3)
        for y in range(y0 + 10, y1, 22):
            d.rectangle((xs[0] - 3, y, xs[-1] + 3, y + 3), fill=(245, 245, 245))
        return
    for k in range(n):
        pts = [(rng.randint(x0, x1), rng.randint(y0, y1)) for _ in range(4)]
        d.line(pts, fill=colours[k % 3], width=3, joint="curve")


def _draw_label(d: Draw, box: Box, obj: SceneObject, rng: random.Random) -> None:
    """White tags with a port name, or smudged tags whose text cannot be read."""
    cols = min(obj.count, 3)
    rows = -(-obj.count // cols)
    x0, y0, x1, y1 = _shrink(box, 0.05)
    cw, ch = (x1 - x0) // cols, (y1 - y0) // rows
    for k in range(obj.count):
        r, c = divmod(k, cols)
        tx, ty = x0 + c * cw, y0 + r * ch
        tag = (tx + 2, ty + 2, tx + cw - 2, ty + min(ch - 2, 20))
        d.rectangle(tag, fill=(248, 248, 240), outline=(80, 80, 80))
        if obj.has(Vocab.READABLE):
            d.text((tag[0] + 3, tag[1] + 3), f"ODF-{rng.randint(1, 48):02d}", fill=(0, 0, 0), font=_font(11))
            continue
        for _ in range(6):
            px, py = rng.randint(tag[0], tag[2]), rng.randint(tag[1], tag[3])
            d.ellipse((px - 4, py - 3, px + 4, py + 3), fill=_jitter(rng, (130, 125, 115), 20))


_DRAWERS: dict[str, Callable[[Draw, Box, SceneObject, random.Random], None]] = {
    Vocab.BBU: _draw_bbu,
    Vocab.BAFFLE: _draw_baffle,
    Vocab.PART: _draw_part,
    Vocab.FIBRE: _draw_fibre,
    Vocab.WIRE: _draw_wire,
    Vocab.LABEL: _draw_label,
}


def _layout(n: int, size: tuple[int, int]) -> list[Box]:
    """Slots in visual order (top-down, left-right), matching the summary's object order."""
    w, h = size
    rows, cols = (1, n) if n <= 2 else (2, 2)
    pad = max(4, w // 40)
    cw, ch = (w - pad) / cols, (h - pad) / rows
    return [
        (round(pad + c * cw), round(pad + r * ch), round((c + 1) * cw), round((r + 1) * ch))
        for r in range(rows)
        for c in range(cols)
    ][:n]


def _render_document(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """An irrelevant photo (无关图片): a page with a title, text lines and sometimes a drawing."""
    w, h = size
    image = Image.new("RGB", size, _jitter(rng, (235, 235, 230), 8))
    d = ImageDraw.Draw(image)
    d.rectangle((w // 12, h // 14, w - w // 12, h - h // 14), fill=(252, 252, 250), outline=(150, 150, 150))
    d.text((w // 8, h // 9), rng.choice(("SITE SURVEY", "WORK ORDER", "DRAWING", "REPORT")), fill=(0, 0, 0))
    y = h // 9 + 18
    if rng.random() < 0.5:  # a floor-plan style drawing
        d.rectangle((w // 6, y, w // 2, y + h // 4), outline=(30, 30, 160), width=2)
        d.line((w // 6, y, w // 2, y + h // 4), fill=(30, 30, 160))
        y += h // 4 + 8
    while y < h - h // 7:
        d.line((w // 8, y, w // 8 + rng.randint(w // 3, w * 2 // 3), y), fill=(110, 110, 110), width=2)
        y += max(6, h // 20)
    return image


def render_image(
    scene: ImageScene, size: tuple[int, int] = _DEFAULT_SIZE, seed: int | str = 0
) -> Image.Image:
    """Draws one photo of ``scene`` at ``size`` (width, height); deterministic for a given ``seed``.

    Small sizes are drawn at a multiple of the size and downscaled, so the geometry never degenerates
    and a 64×48 thumbnail shows the same scene as a 640×480 photo.
    """
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {size}")
    scale = max(1, -(-_MIN_DRAW[0] // width), -(-_MIN_DRAW[1] // height))
    image = _draw_scene(scene, (width * scale, height * scale), random.Random(f"render:{seed}"))
    return image if scale == 1 else image.resize(size, Image.Resampling.LANCZOS)


def _draw_scene(scene: ImageScene, size: tuple[int, int], rng: random.Random) -> Image.Image:
    if scene.irrelevant:
        return _render_document(size, rng)
    image = Image.new("RGB", size, _jitter(rng, (70, 75, 80), 10))
    d = ImageDraw.Draw(image)
    for x in (2, size[0] - 6):  # cabinet rails
        d.rectangle((x, 0, x + 4, size[1]), fill=(150, 150, 150))
    slots = _layout(len(scene.objects), size)
    for obj, box in zip(scene.objects, slots, strict=True):
        _DRAWERS[obj.kind](d, box, obj, rng)
        if obj.has(Vocab.PARTIAL):  # the rest of the object is out of frame
            x0, y0, x1, y1 = box
            d.rectangle((x0 + (x1 - x0) * 2 // 5, y0, x1, y1), fill=(15, 15, 15))
    remark = scene.remark or ""
    if "遮挡" in remark:
        x0, y0, x1, y1 = rng.choice(slots)
        d.ellipse((x0, y0 + (y1 - y0) // 4, x1, y1), fill=_jitter(rng, (150, 110, 80)))
    if "模糊" in remark:
        image = image.filter(ImageFilter.GaussianBlur(radius=max(2, size[0] // 80)))
    if "无法判断" in remark:
        image = image.point(lambda v: v // 3)
    return image
