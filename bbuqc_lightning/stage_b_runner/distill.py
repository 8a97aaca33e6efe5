"""Teacher distillation rows (SPEC §8): the final rollout's selected answers as single-turn chatml.

Every group with a valid selected answer becomes one conversation::

    {"messages": [{"role": "system", "content": <exactly as prompted>},
                  {"role": "user", "content": <exactly as prompted: mission, guidance, summaries>},
                  {"role": "assistant", "content": "不通过\\n理由: …"}],     # think block stripped, no reflection
     "ticket_key": …, "group_id": …, "mission": …, "label": "fail", "verdict": "fail", "teacher_verdict": "fail",
     "weight": 1.0, "conflict": false, "flipped": false, "vote_strength": 0.75, "guidance_version": 3,
     "distill_size": null, "distill_seed": 0, "distill_temperature": 0.3, "teacher": "qwen3-32b"}

The file loads as a ``dataset: chat``, ``template: chatml`` source of the fusion SFT (``messages`` plus
metadata columns; ``weight`` scales the row's loss). Conflicts (label fail, Teacher 通过: the answer would
teach a false pass) follow the policy: ``drop`` (left out), ``flip`` (the assistant says 不通过: a valid
rollout of the same group that said 不通过 if there is one, else the selected answer with its first line
replaced; ``flipped: true``), or ``mark`` (kept as is with ``conflict: true`` and ``weight:
conflict_weight``). Groups with no valid answer are left out (they are in ``manual_review_queue.jsonl``).

:func:`write_distill_file` replaces a file atomically (temporary file + rename): a crash mid-write leaves
the previous file intact. The Lightning side is ``callbacks/distillation.py``.

Example::

    rows, counts = build_distill_rows(module.final_results, "mark", 0.5, {"distill_seed": 0})
    write_distill_file("out/bbu_cabling/distill_chatml.jsonl", rows["BBU线缆布放要求"])
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bbuqc_lightning.constants import LABEL_TO_VERDICT
from bbuqc_lightning.data.jsonl import atomic_write_jsonl
from bbuqc_lightning.stage_b_runner.selection import GroupResult

POLICIES = ("drop", "flip", "mark")


def is_conflict(group: GroupResult) -> bool:
    """The conflict that matters for distillation: the human said fail, the Teacher's selection says pass."""
    return group.label == "fail" and group.selection.verdict == "pass"


def _flipped_answer(group: GroupResult) -> str:
    """A 不通过 answer for a conflicting group: the Teacher's own fail rollout if any, else line 1 replaced."""
    agreeing = next((c for c in group.candidates if c.valid and c.verdict == "fail"), None)
    if agreeing is not None:
        return agreeing.answer
    assert group.selected is not None
    _, _, reason_line = group.selected.answer.partition("\n")
    return f"{LABEL_TO_VERDICT['fail']}\n{reason_line}"


def distill_row(
    group: GroupResult, policy: str, conflict_weight: float, meta: Mapping[str, Any]
) -> tuple[dict[str, Any] | None, str]:
    """``(row or None, outcome)`` with outcome ``kept`` | ``marked`` | ``flipped`` | ``dropped`` | ``invalid``."""
    selected = group.selected
    if selected is None:
        return None, "invalid"
    conflict = is_conflict(group)
    if conflict and policy == "drop":
        return None, "dropped"
    flipped = conflict and policy == "flip"
    answer = _flipped_answer(group) if flipped else selected.answer
    row = {
        "messages": [*group.messages, {"role": "assistant", "content": answer}],
        "ticket_key": group.ticket_key,
        "group_id": group.sample.group_id,
        "mission": group.mission,
        "label": group.label,
        "verdict": "fail" if flipped else group.selection.verdict,
        "teacher_verdict": group.selection.verdict,
        "weight": conflict_weight if conflict and policy == "mark" else 1.0,
        "conflict": conflict,
        "flipped": flipped,
        "vote_strength": group.selection.vote_strength,
        "guidance_version": group.guidance_version,
        **meta,
    }
    outcome = "flipped" if flipped else ("marked" if conflict else "kept")
    return row, outcome


def build_distill_rows(
    results: Iterable[GroupResult], policy: str, conflict_weight: float, meta: Mapping[str, Any]
) -> tuple[dict[str, list[dict[str, Any]]], Counter[str]]:
    """Rows per mission (every mission of ``results``, possibly empty) and outcome counts."""
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    counts: Counter[str] = Counter()
    for group in results:
        row, outcome = distill_row(group, policy, conflict_weight, meta)
        rows.setdefault(group.mission, [])
        counts[outcome] += 1
        counts["conflicts"] += is_conflict(group)
        if row is not None:
            rows[group.mission].append(row)
    return dict(rows), counts


def write_distill_file(path: str | Path, rows: Iterable[Mapping[str, Any]], fsync: bool = True) -> int:
    """Replace ``path`` atomically; temporary files a killed earlier writer left beside it are removed first."""
    path = Path(path)
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    return atomic_write_jsonl(path, rows, fsync=fsync)
