"""One reflection round over every active mission: one batched engine call, then per mission the
outcome (new guidance or pending proposals) and the audit rows to append.

Audit rows (``reflection.jsonl``; the runner adds ``run_id`` and ``epoch``), one per event, ``status``:

- ``applied``: an operation changed the guidance: ``op``, ``id``, ``text``, ``previous_text``,
  ``evidence`` (ticket keys), ``reason``, ``guidance_version`` (before) and ``guidance_version_after``;
- ``pending``: review mode, the same fields, also written to ``pending_proposals.jsonl`` with a
  ``proposal_id`` for ``tools/approve_guidance.py``;
- ``rejected``: ``code``, ``message`` and the ``proposal`` as the model wrote it;
- ``invalid_output``: the answer was not the JSON object asked for (``raw_text`` kept);
- ``no_operations`` / ``no_mistakes``: the round changed nothing (the mission converged).

Every row carries the ``reflection_id`` (``<run_id>/epoch<e>/<mission slug>``) and the ``mission``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bbuqc_lightning.generation.engine import SamplingParams
from bbuqc_lightning.generation.protocol import Engine
from bbuqc_lightning.stage_b.prompts import StageBTemplates
from bbuqc_lightning.stage_b_runner.artifacts import PENDING, REFLECTION, mission_slug
from bbuqc_lightning.stage_b_runner.config import RunnerConfig
from bbuqc_lightning.stage_b_runner.guidance import (
    Change,
    MissionGuidance,
    Operation,
    Rejection,
    apply_operations,
)
from bbuqc_lightning.stage_b_runner.reflection import (
    ReflectionTemplates,
    parse_reflection,
    render_reflection_messages,
    select_cases,
)
from bbuqc_lightning.stage_b_runner.selection import GroupResult


@dataclass
class MissionRound:
    """What one mission's reflection round did."""

    mission: str
    guidance: MissionGuidance  # after the round (unchanged in review mode)
    applied: list[Change] = field(default_factory=list)
    proposed: int = 0
    pending: int = 0
    rejected: int = 0
    invalid_output: bool = False
    rows: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (file name, row)


def change_row(change: Change, status: str, version_after: int) -> dict[str, Any]:
    op = change.operation
    return {
        "status": status,
        "op": op.op,
        "id": change.id,
        "text": op.text,
        "previous_text": change.previous_text,
        "evidence": list(op.evidence),
        "reason": op.reason,
        "guidance_version_after": version_after,
    }


def rejection_row(rejection: Rejection) -> dict[str, Any]:
    proposal = rejection.operation
    if isinstance(proposal, Operation):
        proposal = proposal.to_json()
    return {"status": "rejected", "code": rejection.code, "message": rejection.message, "proposal": proposal}


def mission_outcome(
    guidance: MissionGuidance, cases: Sequence[GroupResult], text: str, cfg: RunnerConfig, reflection_id: str
) -> MissionRound:
    """Parse one answer, check its operations against the guidance, apply them (or queue them for review)."""
    base = {"reflection_id": reflection_id, "mission": guidance.mission, "guidance_version": guidance.version}
    answer = parse_reflection(text, {c.ticket_key for c in cases}, cfg.max_operations_per_round)
    result = MissionRound(guidance.mission, guidance)
    if answer.error is not None:
        row = {"status": "invalid_output", "code": answer.error.code, "message": answer.error.message}
        result.rows.append((REFLECTION, {**base, **row, "raw_text": text}))
        result.invalid_output = True
        return result
    new, changes, state_rejections = apply_operations(guidance, answer.operations)
    rejections = answer.rejected + state_rejections
    result.proposed = len(answer.operations) + len(answer.rejected)
    result.rejected = len(rejections)
    result.rows += [(REFLECTION, {**base, **rejection_row(r)}) for r in rejections]
    if cfg.review_mode:
        for number, change in enumerate(changes):
            row = {**base, **change_row(change, "pending", guidance.version)}
            if change.operation.op == "add":
                row["id"] = None  # the id is given when the proposal is approved
            result.rows += [(REFLECTION, row), (PENDING, {**row, "proposal_id": f"{reflection_id}#{number}"})]
        result.pending = len(changes)
    else:
        result.guidance = new
        result.applied = changes
        result.rows += [(REFLECTION, {**base, **change_row(c, "applied", new.version)}) for c in changes]
    if result.proposed == 0:
        result.rows.append((REFLECTION, {**base, "status": "no_operations"}))
    return result


def reflect_missions(
    engine: Engine,
    guidance: Mapping[str, MissionGuidance],
    groups: Mapping[str, Sequence[GroupResult]],
    templates: StageBTemplates,
    reflection_templates: ReflectionTemplates,
    cfg: RunnerConfig,
    reflection_id: str,
) -> list[MissionRound]:
    """Reflect on each mission's mistakes (one engine call for all missions); missions in ``groups`` order."""
    rounds: dict[str, MissionRound] = {}
    prompts: list[tuple[str, list[GroupResult], list[dict[str, str]]]] = []
    for mission, mission_groups in groups.items():
        cases = select_cases(mission_groups, cfg.max_reflection_cases)
        if not cases:
            row = {"reflection_id": _rid(reflection_id, mission), "mission": mission, "status": "no_mistakes",
                   "guidance_version": guidance[mission].version}  # fmt: skip
            rounds[mission] = MissionRound(mission, guidance[mission], rows=[(REFLECTION, row)])
            continue
        focus = templates.mission_focus[mission]
        messages = render_reflection_messages(
            reflection_templates,
            guidance[mission],
            focus,
            templates.no_guidance,
            cases,
            cfg.max_operations_per_round,
        )
        prompts.append((mission, cases, messages))
    if prompts:
        params = SamplingParams(
            max_new_tokens=cfg.reflection_max_new_tokens,
            do_sample=cfg.reflection_temperature > 0,
            temperature=cfg.reflection_temperature or 1.0,
        )
        outputs = engine.generate([p[2] for p in prompts], params)
        for (mission, cases, _), completions in zip(prompts, outputs, strict=True):
            rid = _rid(reflection_id, mission)
            rounds[mission] = mission_outcome(guidance[mission], cases, completions[0].text, cfg, rid)
    return [rounds[m] for m in groups]


def _rid(reflection_id: str, mission: str) -> str:
    return f"{reflection_id}/{mission_slug(mission)}"
