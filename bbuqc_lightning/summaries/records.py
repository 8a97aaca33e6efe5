"""Stage-A output records (SPEC §4): one JSON object per group, aligned ``图片_1..N``.

``clean_summary`` turns raw generated text into the one line SPEC §4 requires; ``build_stage_a_record``
assembles a group's line and refuses anything misaligned (fail-fast: a wrong ``图片_i`` would make
Stage-B reason about the wrong photo).

>>> clean_summary("<think>...</think>\\n标签/可以识别×2\\n光纤/有保护措施,弯曲半径合理/蛇形管×1")
'标签/可以识别×2，光纤/有保护措施,弯曲半径合理/蛇形管×1'
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from bbuqc_lightning.constants import (
    IMAGE_KEY_PREFIX,
    LABELS,
    LEGACY_IMAGE_KEY_PREFIX,
    OBJECT_SEPARATOR,
    THINK_CLOSE,
    THINK_OPEN,
    image_key,
    ticket_key,
)
from bbuqc_lightning.data.tree import GroupRecord

# Keys of a read record's per_image: 图片_i (SPEC §4) or the legacy image_i.
_KEY_PATTERN = re.compile(rf"^({re.escape(IMAGE_KEY_PREFIX)}|{re.escape(LEGACY_IMAGE_KEY_PREFIX)})([0-9]+)$")

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


def _normalise_per_image(per_image: Any) -> dict[str, str]:
    """``{"图片_1": …, …}`` in numeric order from ``图片_i`` or legacy ``image_i`` keys; raises ``ValueError``.

    >>> _normalise_per_image({"image_2": "b", "image_1": "a"})
    {'图片_1': 'a', '图片_2': 'b'}
    """
    if not isinstance(per_image, Mapping) or not per_image:
        raise ValueError("'per_image' must be a non-empty mapping")
    numbered: dict[int, str] = {}
    prefixes: set[str] = set()
    for key, summary in per_image.items():
        match = _KEY_PATTERN.match(str(key))
        if match is None:
            raise ValueError(f"unexpected per_image key {key!r} (expected 图片_i or image_i)")
        prefixes.add(match.group(1))
        if not isinstance(summary, str) or not summary.strip() or "\n" in summary or "\r" in summary:
            raise ValueError(f"summary of {key!r} must be one non-empty line, got {summary!r}")
        numbered[int(match.group(2))] = summary
    if len(prefixes) > 1:
        raise ValueError("per_image mixes 图片_i and image_i keys")
    expected = list(range(1, len(per_image) + 1))
    if sorted(numbered) != expected:
        raise ValueError(f"per_image keys must be exactly 1..{len(per_image)}, got {sorted(per_image)}")
    return {image_key(i): numbered[i] for i in expected}


def normalise_stage_a_record(raw: Any) -> dict[str, Any]:
    """Validate one decoded Stage-A line and return it with ``图片_i`` keys and a ``ticket_key``."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
    missing = [k for k in ("group_id", "mission", "per_image") if k not in raw]
    if missing:
        raise ValueError(f"missing keys {missing}")
    group_id, mission, label = raw["group_id"], raw["mission"], raw.get("label")
    if not isinstance(group_id, str) or not group_id or not isinstance(mission, str) or not mission:
        raise ValueError("'group_id' and 'mission' must be non-empty strings")
    if label is not None and label not in LABELS:
        raise ValueError(f"group {group_id}: label must be one of {list(LABELS)} or null, got {label!r}")
    try:
        per_image = _normalise_per_image(raw["per_image"])
    except ValueError as err:
        raise ValueError(f"group {group_id}: {err}") from err
    images = raw.get("images")
    if images is not None and (not isinstance(images, list) or len(images) != len(per_image)):
        raise ValueError(f"group {group_id}: {len(per_image)} summaries for images {images!r}")
    expected_key = ticket_key(group_id, label)
    if raw.get("ticket_key", expected_key) != expected_key:
        raise ValueError(f"group {group_id}: ticket_key {raw['ticket_key']!r} != {expected_key!r}")
    record = dict(raw)
    record.update(per_image=per_image, ticket_key=expected_key, label=label)
    return record
