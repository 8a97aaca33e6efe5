"""Derive the four kinds of fusion JSONL from the synthetic data set (the embedded fusion SFT demo).

Written under ``<synthetic_dir>/fusion/`` on first use (``manifest.json`` last, so a half-written folder
is rebuilt), from the synthetic tree and its reference Stage-A JSONL (``stage_a_<split>.jsonl``):

- ``bbu_<split>.jsonl`` — one row per photo: ``{"images": ["../<split>/.../IMG_3.jpg"], "mission",
  "summary", "dense", "ticket_key", "image_key", "label"}``. ``summary`` is the photo's reference one-line
  summary; ``dense`` is the same facts written out one object per line with the ``dense_object``
  template of the config (a stand-in for real dense captions: longer, structured, same content); ``label``
  is its ticket's (so ``fail_oversample`` can draw the photos of fail tickets more often).
  Used by the ``bbu_summary`` target (``mode: summary``) and the ``bbu_dense`` source (``mode: dense``).
- ``stage_b_<split>.jsonl`` — the distillation file's shape (``messages`` = system + user exactly as the
  Stage-B builder renders them + the assistant verdict; ``ticket_key``, ``group_id``, ``mission``,
  ``label``). The answer is rule-derived: ``通过`` / ``不通过`` and ``理由:`` naming the broken rules
  (``explain_group``), checked against the SPEC §5 contract before it is written.
- ``chat_train.jsonl`` — general chat in the COIG-CQIA shape (``instruction`` / ``output``): questions
  about each mission from the config, answered with the mission's ``mission_focus``.

Every Chinese phrase comes from the config (``data.synthetic_sources`` in ``conf/data/fusion.yaml``).

Example::

    ensure_fusion_sources("data/synthetic/fusion", "data/synthetic", cfg.prompts.stage_b,
                          cfg.data.synthetic_sources.texts)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bbuqc_lightning.constants import IRRELEVANT_IMAGE, image_key
from bbuqc_lightning.data.jsonl import atomic_write, atomic_write_jsonl
from bbuqc_lightning.data.synthetic.scenes import parse_summary
from bbuqc_lightning.data.tree import scan_tree
from bbuqc_lightning.stage_b.builder import read_stage_a_jsonl
from bbuqc_lightning.stage_b.prompts import as_templates
from bbuqc_lightning.stage_b.reference_answers import stage_b_rows

SPLITS = ("train", "val")
_MANIFEST = "manifest.json"
VERSION = 2  # 2: bbu rows carry their ticket's label; a folder written by another version is rewritten


def ensure_fusion_sources(
    out_dir: str | os.PathLike[str],
    synthetic_dir: str | os.PathLike[str],
    stage_b_templates: Mapping[str, Any],
    texts: Mapping[str, Any],
) -> Path:
    """Write the fusion JSONL files unless ``<out_dir>/manifest.json`` exists from this :data:`VERSION`;
    returns ``out_dir``."""
    out = Path(out_dir)
    if not (out / _MANIFEST).exists() or is_stale(out):
        write_fusion_sources(out, Path(synthetic_dir), stage_b_templates, texts)
    return out


def is_stale(out_dir: str | os.PathLike[str]) -> bool:
    """``<out_dir>`` holds fusion files whose ``manifest.json`` is missing, unreadable or from another
    :data:`VERSION` of this module (a folder that holds no file at all is not stale: it is empty)."""
    out = Path(out_dir)
    manifest = out / _MANIFEST
    if not manifest.exists():
        return out.is_dir() and any(out.glob("*.jsonl"))
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return not isinstance(data, dict) or data.get("version") != VERSION


def write_fusion_sources(
    out: Path, synthetic_dir: Path, stage_b_templates: Mapping[str, Any], texts: Mapping[str, Any]
) -> dict[str, int]:
    """Write every file (each atomically, the manifest last); returns rows per file."""
    counts: dict[str, int] = {}
    for split in SPLITS:
        records, _ = read_stage_a_jsonl(synthetic_dir / f"stage_a_{split}.jsonl")
        images = _images_by_ticket(synthetic_dir / split)
        counts[f"bbu_{split}.jsonl"] = atomic_write_jsonl(
            out / f"bbu_{split}.jsonl", bbu_rows(records, images, out, texts)
        )
        counts[f"stage_b_{split}.jsonl"] = atomic_write_jsonl(
            out / f"stage_b_{split}.jsonl", stage_b_rows(records, stage_b_templates, texts)
        )
    counts["chat_train.jsonl"] = atomic_write_jsonl(
        out / "chat_train.jsonl", chat_rows(stage_b_templates, texts)
    )
    manifest = {
        "generator": "bbuqc_lightning.fusion_sft.synthetic_sources",
        "version": VERSION,
        "from": str(synthetic_dir),
        **counts,
    }
    text = json.dumps(manifest, ensure_ascii=False, indent=2) + "\n"
    atomic_write(out / _MANIFEST, [text.encode("utf-8")])  # a reader never sees half of it
    return counts


def _images_by_ticket(root: Path) -> dict[str, tuple[Path, ...]]:
    return {record.ticket_key: record.image_paths for record in scan_tree(root).records}


def bbu_rows(
    records: Sequence[Mapping[str, Any]],
    images: Mapping[str, Sequence[Path]],
    out: Path,
    texts: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """One row per photo, with its summary and the dense rewrite; image paths relative to ``out``."""
    rows = []
    for record in records:
        paths = images.get(record["ticket_key"])
        if paths is None or len(paths) != len(record["per_image"]):
            raise ValueError(f"{record['ticket_key']}: the tree and the Stage-A JSONL disagree on its photos")
        for i, path in enumerate(paths, start=1):
            summary = record["per_image"][image_key(i)]
            rows.append(
                {
                    "images": [os.path.relpath(path, out)],
                    "mission": record["mission"],
                    "summary": summary,
                    "dense": dense_caption(summary, texts),
                    "ticket_key": record["ticket_key"],
                    "image_key": image_key(i),
                    "label": record.get("label"),
                }
            )
    return rows


def dense_caption(summary: str, texts: Mapping[str, Any]) -> str:
    """The summary's objects one per line (``texts.dense_object``), then the remark (``texts.dense_remark``).

    >>> t = {"dense_object": "{index}. {kind}: {attributes} ({count})", "dense_remark": "R: {remark}",
    ...      "attribute_separator": ", "}
    >>> print(dense_caption("电线/捆扎整齐×2，备注: 光线充足", t))
    1. 电线: 捆扎整齐 (2)
    R: 光线充足
    """
    if summary == IRRELEVANT_IMAGE:
        return IRRELEVANT_IMAGE
    objects, remark = parse_summary(summary)
    separator = texts["attribute_separator"]
    lines = [
        texts["dense_object"].format(
            index=i, kind=obj.kind, attributes=separator.join(obj.attrs + obj.conditional), count=obj.count
        )
        for i, obj in enumerate(objects, start=1)
    ]
    if remark:
        lines.append(texts["dense_remark"].format(remark=remark))
    return "\n".join(lines)


def chat_rows(stage_b_templates: Mapping[str, Any], texts: Mapping[str, Any]) -> list[dict[str, Any]]:
    """COIG-CQIA-shaped rows: each configured question per mission, answered with its mission focus."""
    focus = as_templates(stage_b_templates).mission_focus
    return [
        {"instruction": question.format(mission=mission), "input": "", "output": answer}
        for mission, answer in focus.items()
        for question in texts["chat_questions"]
    ]
