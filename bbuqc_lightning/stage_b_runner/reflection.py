"""Reflection: show the model one mission's mistakes with its guidance; parse strict JSON operations.

The answer must be one JSON object ``{"operations": [...]}`` (after an optional leading Qwen3 think
block; one surrounding markdown code fence is tolerated because instruction-tuned models add it
unasked). Each operation is exactly one of::

    {"op": "add",    "text": "…", "evidence": ["<ticket_key>", …], "reason": "…"}
    {"op": "edit",   "id": "G1", "text": "…", "evidence": [...], "reason": "…"}
    {"op": "delete", "id": "G2", "evidence": [...], "reason": "…"}

Nothing else is accepted: an unknown or missing key, an empty reason, or evidence that is not a ticket
key of the cases shown rejects that operation (with a code); an answer that is not such an object rejects
the whole answer. Rejections are logged by the runner, never applied. Whether an operation fits the
guidance (known id, size cap, duplicate text) is checked by :mod:`~bbuqc_lightning.stage_b_runner.guidance`.

Example::

    >>> a = parse_reflection('{"operations": [{"op": "delete", "id": "G0", "evidence": ["K::fail"], "reason": "错"}]}', {"K::fail"})
    >>> a.operations[0].op, a.rejected, a.error
    ('delete', [], None)
    >>> parse_reflection("好的，我来修改", {"K::fail"}).error.code
    'not_json'
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bbuqc_lightning.constants import LABEL_TO_VERDICT
from bbuqc_lightning.stage_b.contract import strip_think
from bbuqc_lightning.stage_b.prompts import format_guidance, format_summaries
from bbuqc_lightning.stage_b_runner.guidance import OPS, MissionGuidance, Operation, Rejection
from bbuqc_lightning.stage_b_runner.selection import GroupResult

_FIELDS = {
    "user": {"mission", "mission_focus", "guidance", "num_experiences", "max_experiences", "max_chars",
             "max_operations", "num_cases", "cases"},
    "case": {"index", "ticket_key", "label", "selected", "pass_votes", "fail_votes", "invalid_votes",
             "rollouts", "summaries"},
    "rollout_line": {"index", "verdict", "reason"},
}  # fmt: skip
_KEYS = {
    "add": {"op", "text", "evidence", "reason"},
    "edit": {"op", "id", "text", "evidence", "reason"},
    "delete": {"op", "id", "evidence", "reason"},
}
_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n```$", re.DOTALL)


@dataclass(frozen=True)
class ReflectionTemplates:
    """The reflection prompt pieces of ``conf/prompts/reflection.yaml``."""

    system: str
    user: str
    case: str
    rollout_line: str
    invalid_answer: str
    unlabelled: str

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> ReflectionTemplates:
        """Validate a loaded YAML/Hydra mapping, reporting every problem at once."""
        names = ("system", "user", "case", "rollout_line", "invalid_answer", "unlabelled")
        problems = [f"missing key {k!r}" for k in names if not isinstance(mapping.get(k), str)]
        for key, allowed in _FIELDS.items():
            if isinstance(mapping.get(key), str):
                unknown = sorted(_format_fields(mapping[key], key) - allowed)
                if unknown:
                    problems.append(f"{key}: unknown fields {unknown} (allowed: {sorted(allowed)})")
        if problems:
            raise ValueError("Reflection prompt templates (prompts.reflection): " + "; ".join(problems))
        return cls(**{k: mapping[k] for k in names})


def _format_fields(template: str, key: str) -> set[str]:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f}
    except ValueError as err:
        raise ValueError(f"Reflection prompt templates: {key} is not a valid format string: {err}") from err


# ------------------------------------------------------------------------------------------ cases
def _priority(group: GroupResult) -> int:
    """False passes first (the costly error), then other label conflicts, invalid answers, disagreements."""
    if group.label == "fail" and group.selection.verdict == "pass":
        return 0
    if group.conflict_flag:
        return 1
    if group.label_match is False:
        return 2
    return 3


def select_cases(groups: Sequence[GroupResult], max_cases: int) -> list[GroupResult]:
    """The mistakes worth reflecting on, most costly first, at most ``max_cases`` (stable order)."""
    mistakes = [g for g in groups if g.is_mistake]
    return sorted(mistakes, key=_priority)[:max_cases]


def _verdict_word(verdict: str | None, templates: ReflectionTemplates) -> str:
    return LABEL_TO_VERDICT.get(verdict or "", templates.invalid_answer)


def render_case(index: int, group: GroupResult, templates: ReflectionTemplates) -> str:
    """One case block: label, selected verdict with votes, every rollout's verdict and reason, summaries."""
    rollouts = "\n".join(
        templates.rollout_line.format(
            index=c.index + 1,
            verdict=_verdict_word(c.verdict if c.valid else None, templates),
            reason=c.reason if c.valid else (c.error or ""),
        )
        for c in group.candidates
    )
    votes = group.selection.votes
    return templates.case.format(
        index=index,
        ticket_key=group.ticket_key,
        label=templates.unlabelled if group.label is None else LABEL_TO_VERDICT[group.label],
        selected=_verdict_word(group.selection.verdict, templates),
        pass_votes=votes["pass"],
        fail_votes=votes["fail"],
        invalid_votes=votes["invalid"],
        rollouts=rollouts,
        summaries=format_summaries(group.sample.summaries),
    )


def render_reflection_messages(
    templates: ReflectionTemplates,
    guidance: MissionGuidance,
    mission_focus: str,
    no_guidance: str,
    cases: Sequence[GroupResult],
    max_operations: int,
) -> list[dict[str, str]]:
    """System + user messages of one mission's reflection round."""
    user = templates.user.format(
        mission=guidance.mission,
        mission_focus=mission_focus,
        guidance=format_guidance(guidance.as_prompt(), no_guidance),
        num_experiences=len(guidance.experiences),
        max_experiences=guidance.limits.max_experiences,
        max_chars=guidance.limits.max_chars,
        max_operations=max_operations,
        num_cases=len(cases),
        cases="\n\n".join(render_case(i, g, templates) for i, g in enumerate(cases, start=1)),
    )
    return [{"role": "system", "content": templates.system}, {"role": "user", "content": user}]


# ------------------------------------------------------------------------------------------ parsing
@dataclass
class ReflectionAnswer:
    """Parsed reflection: well-formed operations, rejected ones, or an ``error`` for the whole answer."""

    operations: list[Operation] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    error: Rejection | None = None


def _json_body(text: str) -> tuple[Any, Rejection | None]:
    body = strip_think(text)
    if body is None:
        return None, Rejection("think_unterminated", "a <think> block is never closed", text)
    body = body.strip()
    fenced = _FENCE.match(body)
    try:
        return json.loads(fenced.group(1) if fenced else body), None
    except json.JSONDecodeError as err:
        return None, Rejection(
            "not_json", f"the answer is not one JSON object ({err.msg} at {err.pos})", text
        )


def _operation(item: Any, allowed_evidence: set[str]) -> Operation | Rejection:
    """One operation object -> :class:`Operation`, or the first thing wrong with it."""
    if not isinstance(item, Mapping):
        return Rejection("not_object", f"an operation must be an object, got {type(item).__name__}", item)
    op = item.get("op")
    if op not in OPS:
        return Rejection("unknown_op", f"op must be one of {OPS}, got {op!r}", item)
    keys = set(item)
    if keys != _KEYS[op]:
        missing, extra = sorted(_KEYS[op] - keys), sorted(keys - _KEYS[op])
        return Rejection(
            "bad_keys", f"{op} needs exactly {sorted(_KEYS[op])} (missing {missing}, unknown {extra})", item
        )
    strings = {k: item[k] for k in ("id", "text", "reason") if k in item}
    bad = sorted(k for k, v in strings.items() if not isinstance(v, str) or not v.strip())
    if bad:
        return Rejection("bad_value", f"{bad} must be non-empty strings", item)
    evidence = item["evidence"]
    if not isinstance(evidence, list) or not evidence or not all(isinstance(k, str) for k in evidence):
        return Rejection("bad_evidence", "evidence must be a non-empty list of ticket keys", item)
    unknown = sorted(set(evidence) - allowed_evidence)
    if unknown:
        return Rejection("unknown_evidence", f"evidence {unknown} is not among the cases shown", item)
    return Operation(op, item.get("id"), item.get("text"), tuple(evidence), item["reason"].strip())


def parse_reflection(text: str, allowed_evidence: set[str], max_operations: int = 5) -> ReflectionAnswer:
    """Parse one reflection answer (never raises); see the module docstring for the schema."""
    data, error = _json_body(text)
    if error is not None:
        return ReflectionAnswer(error=error)
    if (
        not isinstance(data, Mapping)
        or set(data) != {"operations"}
        or not isinstance(data["operations"], list)
    ):
        return ReflectionAnswer(error=Rejection("bad_shape", 'expected exactly {"operations": [...]}', text))
    answer = ReflectionAnswer()
    for position, item in enumerate(data["operations"]):
        if position >= max_operations:
            answer.rejected.append(
                Rejection("too_many_operations", f"more than max_operations_per_round={max_operations}", item)
            )
            continue
        parsed = _operation(item, allowed_evidence)
        if isinstance(parsed, Rejection):
            answer.rejected.append(parsed)
        else:
            answer.operations.append(parsed)
    return answer
