"""The report's one plot: held-out false-pass rate (Stage-B from reference summaries, seed mean) by stage, one
bar per mission and one for all tickets, with the 5 % target as a line. Drawn with matplotlib when it is
installed, otherwise with Pillow (a project dependency), so the page always has its figure."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

TARGET = 0.05
COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")


def draw(stages: Sequence[str], series: dict[str, list[float | None]], out: Path) -> tuple[Path, str]:
    """``series``: name -> one value per stage (None: not measured). Returns (png, which library drew it)."""
    try:
        import matplotlib
    except ImportError:
        return _pillow(stages, series, out), "Pillow (matplotlib is not installed)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(stages))], [v or 0.0 for v in values], width, label=name)
    ax.axhline(TARGET, color="black", linestyle="--", linewidth=0.8, label="5 % target")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(stages))], list(stages))
    ax.set_ylabel("false-pass rate (held-out, Stage-B)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out, "matplotlib"


def _pillow(stages: Sequence[str], series: dict[str, list[float | None]], out: Path) -> Path:
    left, top, plot_h, group_w, bar_w = 60, 30, 260, 150, 24
    width, height = left + group_w * len(stages) + 170, top + plot_h + 50
    image = Image.new("RGB", (width, height), "white")
    pen, font = ImageDraw.Draw(image), ImageFont.load_default(size=12)
    top_value = max([TARGET, *(v for vals in series.values() for v in vals if v is not None)]) * 1.1

    def y(value: float) -> float:
        return top + plot_h * (1 - value / top_value)

    pen.text((left, 6), "false-pass rate (held-out, Stage-B, seed mean)", fill="black", font=font)
    pen.line([(left, top), (left, top + plot_h), (width - 170, top + plot_h)], fill="black")
    for tick in (0.0, top_value / 2, top_value):
        pen.text((6, y(tick) - 6), f"{tick:.2f}", fill="black", font=font)
    for s, stage in enumerate(stages):
        x0 = left + 10 + s * group_w
        for i, values in enumerate(series.values()):
            if values[s] is not None:
                pen.rectangle([x0 + i * bar_w, y(values[s]), x0 + (i + 1) * bar_w - 3, top + plot_h],
                              fill=COLOURS[i % len(COLOURS)])  # fmt: skip
        pen.text((x0, top + plot_h + 8), stage, fill="black", font=font)
    pen.line([(left, y(TARGET)), (width - 170, y(TARGET))], fill="black", width=1)
    for i, name in enumerate([*series, "5 % target"]):
        colour = COLOURS[i % len(COLOURS)] if name in series else "black"
        pen.rectangle([width - 160, top + i * 20, width - 148, top + i * 20 + 12], fill=colour)
        pen.text((width - 142, top + i * 20), name, fill="black", font=font)
    image.save(out)
    return out
