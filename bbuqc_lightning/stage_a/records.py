"""Stage-A output records (SPEC §4): one JSON object per group, aligned ``图片_1..N``.

``clean_summary`` turns raw generated text into the one line SPEC §4 requires; ``build_stage_a_record``
assembles a group's line and refuses anything misaligned (fail-fast: a wrong ``图片_i`` would make
Stage-B reason about the wrong photo).

>>> clean_summary("<think>...</think>\\n标签/可以识别×2\\n光纤/有保护措施,弯曲半径合理/蛇形管×1")
'标签/可以识别×2，光纤/有保护措施,弯曲半径合理/蛇形管×1'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bbuqc_lightning.constants import OBJECT_SEPARATOR, THINK_CLOSE, THINK_OPEN, image_key, ticket_key
from bbuqc_lightning.data.tree import GroupRecord

STAGE_A_FIELDS: tuple[str, ...] = ("group_id", "ticket_key", "mission", "label", "images", "per_image")

# Separators a model may leave at the edge of a line when it puts one object per line.
_EDGE_SEPARATORS = OBJECT_SEPARATOR + ",;；、 \t"


def clean_summary(text: str) -> str:
    """One line from a raw generation: drop a ``<think>…</think>`` block, join lines with ``，``.

    Why join rather than keep the first line: the summary grammar is a ``，``-separated list of objects,
    and a small VLM that drifts into one-object-per-line output would otherwise lose every object but
    the first, e.g. a later ``不符合要求`` item, which could turn into a false pass in Stage-B. Joining
    keeps all the evidence and yields the grammar's own separator. Separators left at the edges of the
    joined lines are trimmed so no ``，，`` appears. A lone ``</think>`` (the chat template opened the
    block) cuts everything before it; an unterminated ``<think>`` (generation stopped while thinking)
    leaves nothing. May return ``""``: the caller raises, naming the group and image.

    >>> clean_summary("  无关图片 ")
    '无关图片'
    >>> clean_summary("<think>still thinking")
    ''
    """
    if THINK_CLOSE in text:
        text = text.rsplit(THINK_CLOSE, 1)[1]
    elif text.lstrip().startswith(THINK_OPEN):
        return ""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    parts = [line.strip(_EDGE_SEPARATORS) for line in lines]
    return OBJECT_SEPARATOR.join(part for part in parts if part)


def build_stage_a_record(record: GroupRecord, summaries: Sequence[str]) -> dict[str, Any]:
    """The SPEC §4 line of ``record``: ``per_image`` maps ``图片_1..N`` to the N summaries, in order.

    Raises ``ValueError`` naming the group's ``ticket_key`` (and the image) when the number of
    summaries differs from the number of images, or a summary is empty, not a string or not one line.
    """
    images = record.image_paths
    if len(summaries) != len(images):
        raise ValueError(
            f"Stage-A alignment error for group {record.ticket_key}: {len(images)} images but "
            f"{len(summaries)} summaries (folders {list(record.folders)})"
        )
    per_image = {}
    for index, (path, summary) in enumerate(zip(images, summaries, strict=True), start=1):
        _check_summary(record.ticket_key, f"{image_key(index)} ({path})", summary)
        per_image[image_key(index)] = summary
    return {
        "group_id": record.group_id,
        "ticket_key": record.ticket_key,
        "mission": record.mission,
        "label": record.label,
        "images": [path.name for path in images],
        "per_image": per_image,
    }


def check_stage_a_line(row: Mapping[str, Any]) -> None:
    """Validate an already-written SPEC §4 object (e.g. a line read back for a merge or a resume).

    Raises ``ValueError`` naming the ticket (or the missing field).
    """
    missing = [name for name in STAGE_A_FIELDS if name not in row]
    if missing:
        raise ValueError(f"Stage-A line {row.get('ticket_key', row)!r} lacks fields {missing}")
    key = row["ticket_key"]
    if key != ticket_key(row["group_id"], row["label"]):
        raise ValueError(f"Stage-A line {key!r}: ticket_key does not match group_id/label")
    images, per_image = row["images"], row["per_image"]
    expected = [image_key(i) for i in range(1, len(images) + 1)]
    if not images or list(per_image) != expected:
        raise ValueError(
            f"Stage-A line {key!r}: per_image keys {list(per_image)} do not match the {len(images)} images"
        )
    for name, image in zip(expected, images, strict=True):
        _check_summary(key, f"{name} ({image})", per_image[name])


def _check_summary(ticket: str, where: str, summary: object) -> None:
    if not isinstance(summary, str):
        raise ValueError(f"group {ticket}, {where}: summary must be a string, got {type(summary).__name__}")
    if not summary.strip():
        raise ValueError(f"group {ticket}, {where}: empty summary")
    if len(summary.splitlines()) != 1 or "\n" in summary or "\r" in summary:
        raise ValueError(f"group {ticket}, {where}: summary is not a single line: {summary!r}")
