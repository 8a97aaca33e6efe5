"""Confusion matrices of Stage-B verdicts per mission, counted and drawn as PNG (Pillow; no matplotlib).

Rows are the human label (``pass``, ``fail``), columns the model's verdict (``pass`` = 通过,
``fail`` = 不通过, ``invalid`` = broke the two-line contract). The false-pass cell (label fail, verdict
pass — 误放行) is outlined in red: it is the number the team must keep below 5 %. An invalid answer
has its own column because it is neither a pass nor a fail (it goes to manual review). Unlabelled
groups are not counted.

Example::

    counts = ConfusionCounts()
    counts.add("bbu_grounding", label="fail", verdict="pass", valid=True)
    counts.save_pngs("outputs/eval/runs/x/confusion")   # -> {"bbu_grounding": .../bbu_grounding.png, "all": ...}
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

LABELS: tuple[str, ...] = ("pass", "fail")
VERDICTS: tuple[str, ...] = ("pass", "fail", "invalid")
OVERALL = "all"
FALSE_PASS_CELL = (LABELS.index("fail"), VERDICTS.index("pass"))

_CELL_W, _CELL_H, _LEFT, _TOP, _PAD, _FOOT = 110, 56, 110, 74, 16, 24
_FONT_SIZE = 15


class ConfusionCounts:
    """``{name: 2x3 counts}`` for each mission slug plus :data:`OVERALL`."""

    def __init__(self) -> None:
        self.tables: dict[str, list[list[int]]] = {}

    def add(self, name: str, label: str | None, verdict: str | None, valid: bool) -> None:
        """Count one answer under ``name`` and under :data:`OVERALL` (unlabelled answers are ignored)."""
        if label not in LABELS:
            return
        column = VERDICTS.index(verdict) if valid and verdict in LABELS else VERDICTS.index("invalid")
        for key in (name, OVERALL):
            table = self.tables.setdefault(key, [[0] * len(VERDICTS) for _ in LABELS])
            table[LABELS.index(label)][column] += 1

    def as_dict(self) -> dict[str, dict[str, object]]:
        """JSON-ready form: ``{name: {"labels": [...], "verdicts": [...], "counts": [[...], [...]]}}``."""
        return {
            name: {"labels": list(LABELS), "verdicts": list(VERDICTS), "counts": table}
            for name, table in sorted(self.tables.items())
        }

    def save_pngs(self, folder: str | Path) -> dict[str, Path]:
        """Draw every matrix to ``<folder>/<name>.png``; returns ``{name: path}``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, table in sorted(self.tables.items()):
            paths[name] = folder / f"{name}.png"
            draw_confusion(table, title=name).save(paths[name])
        return paths


def _font(size: int = _FONT_SIZE) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _cell_colour(count: int, row_total: int) -> tuple[int, int, int]:
    """White (0 % of the row) to deep blue (100 %)."""
    share = count / row_total if row_total else 0.0
    return (int(255 - 200 * share), int(255 - 150 * share), 255)


def draw_confusion(table: list[list[int]], title: str) -> Image.Image:
    """One matrix as an RGB image: counts and row shares, false-pass cell outlined in red."""
    width = _LEFT + _CELL_W * len(VERDICTS) + _PAD
    height = _TOP + _CELL_H * len(LABELS) + _FOOT + _PAD
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    total = sum(map(sum, table))
    draw.text((_PAD, 8), f"{title}  (n={total})", fill="black", font=_font(_FONT_SIZE + 2))
    draw.text((_LEFT, 32), "model verdict ->", fill="dimgray", font=_font())
    draw.text((_PAD, _TOP - 22), "human label", fill="dimgray", font=_font())
    for c, verdict in enumerate(VERDICTS):
        draw.text((_LEFT + c * _CELL_W + 8, _TOP - 22), verdict, fill="black", font=_font())
    for r, label in enumerate(LABELS):
        y = _TOP + r * _CELL_H
        draw.text((_PAD, y + _CELL_H // 2 - 8), label, fill="black", font=_font())
        row_total = sum(table[r])
        for c, count in enumerate(table[r]):
            box = (_LEFT + c * _CELL_W, y, _LEFT + (c + 1) * _CELL_W, y + _CELL_H)
            false_pass = (r, c) == FALSE_PASS_CELL
            outline, line = ("red", 3) if false_pass else ("gray", 1)
            draw.rectangle(box, fill=_cell_colour(count, row_total), outline=outline, width=line)
            share = f"{100 * count / row_total:.0f}%" if row_total else "-"
            draw.text((box[0] + 10, box[1] + 8), str(count), fill="black", font=_font(_FONT_SIZE + 3))
            draw.text((box[0] + 10, box[1] + 32), share, fill="dimgray", font=_font(_FONT_SIZE - 2))
    foot = (_PAD, _TOP + _CELL_H * len(LABELS) + 8)
    draw.text(
        foot, "red box: false pass (label fail, verdict pass); % of the row", fill="red", font=_font(12)
    )
    return image
