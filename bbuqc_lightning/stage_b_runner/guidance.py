"""Versioned per-mission guidance: the numbered experiences ``G0, G1, …`` shown in every Stage-B prompt.

Decisions:

1. Ids are ``G<n>`` and never reused: a deleted ``G2`` stays retired (``next_id`` is kept in the file),
   so ``reflection.jsonl`` always means one rule by one id.
2. Experiences are kept in *natural* id order (``G2`` before ``G10``), edits keep their place.
3. One version per reflection round that changes something; version 0 is the initial guidance.
4. :func:`apply_operations` is pure: it returns a new :class:`MissionGuidance` plus the applied changes
   and the rejected operations (each with a code), so review mode can plan without applying.
5. Limits: at most ``max_experiences`` experiences (an ``add`` beyond it is rejected, ``size_cap``),
   each one line of at most ``max_chars`` characters.

File form (``guidance.json``, readable by :func:`bbuqc_lightning.stage_b.builder.load_guidance`)::

    {"mission": "BBU接地线检查", "version": 2, "next_id": 3,
     "experiences": [{"id": "G0", "text": "…", "version": 1, "evidence": ["QC-…::fail"], "reason": "…"}]}

Example::

    >>> g = MissionGuidance("BBU接地线检查")
    >>> g2, changes, rejected = apply_operations(g, [Operation("add", None, "接地螺丝需符合要求", ("K::fail",), "漏判")])
    >>> g2.as_prompt(), g2.version, rejected
    ({'G0': '接地螺丝需符合要求'}, 1, [])
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

OpName = Literal["add", "edit", "delete"]
OPS: tuple[str, ...] = ("add", "edit", "delete")
_ID = re.compile(r"^G([0-9]+)$")


def id_number(exp_id: str) -> int:
    """``"G12"`` -> 12; raises ``ValueError`` for anything else."""
    match = _ID.match(exp_id)
    if match is None:
        raise ValueError(f"experience id must look like G0, G1, …, got {exp_id!r}")
    return int(match.group(1))


@dataclass(frozen=True)
class Experience:
    """One numbered rule, with the change that last wrote it (audit trail)."""

    id: str
    text: str
    version: int = 0
    evidence: tuple[str, ...] = ()
    reason: str | None = None


@dataclass(frozen=True)
class Operation:
    """One proposed change; ``id`` is ``None`` for ``add``, ``text`` is ``None`` for ``delete``."""

    op: OpName
    id: str | None
    text: str | None
    evidence: tuple[str, ...]
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "id": self.id,
            "text": self.text,
            "evidence": list(self.evidence),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Change:
    """An operation as applied: the id it got (``add``) and the text it replaced (``edit``/``delete``)."""

    operation: Operation
    id: str
    previous_text: str | None


@dataclass(frozen=True)
class Rejection:
    """An operation (or a whole reflection answer) refused, with a code and a readable message."""

    code: str
    message: str
    operation: Any = None  # the raw operation as proposed (dict, Operation or None)


@dataclass(frozen=True)
class GuidanceLimits:
    max_experiences: int = 20
    max_chars: int = 200


@dataclass(frozen=True)
class MissionGuidance:
    """One mission's experiences (natural id order), version and id counter."""

    mission: str
    experiences: tuple[Experience, ...] = ()
    version: int = 0
    next_id: int = 0
    limits: GuidanceLimits = field(default_factory=GuidanceLimits)

    def as_prompt(self) -> dict[str, str]:
        """``{id: text}`` in natural order, as :func:`~bbuqc_lightning.stage_b.prompts.format_guidance` wants."""
        return {e.id: e.text for e in self.experiences}

    def get(self, exp_id: str) -> Experience | None:
        return next((e for e in self.experiences if e.id == exp_id), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "mission": self.mission,
            "version": self.version,
            "next_id": self.next_id,
            "experiences": [_experience_json(e) for e in self.experiences],
        }

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], where: str, limits: GuidanceLimits | None = None
    ) -> MissionGuidance:
        """Read one mission's block; items are ``{"id", "text", …}`` or plain strings (numbered ``G0…``)."""
        mission = data.get("mission")
        items = data.get("experiences")
        if not isinstance(mission, str) or not mission or not isinstance(items, list):
            raise ValueError(f"{where}: expected {{'mission': str, 'experiences': [...]}}")
        experiences = _experiences_from_json(items, where)
        top = max((id_number(e.id) + 1 for e in experiences), default=0)
        next_id = int(data.get("next_id", top))
        if next_id < top:
            raise ValueError(f"{where}: next_id={next_id} but ids go up to G{top - 1}")
        return cls(mission, experiences, int(data.get("version", 0)), next_id, limits or GuidanceLimits())


def _experience_json(e: Experience) -> dict[str, Any]:
    row = asdict(e)
    row["evidence"] = list(e.evidence)
    return row


def _experiences_from_json(items: Sequence[Any], where: str) -> tuple[Experience, ...]:
    experiences: list[Experience] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"id": f"G{i}", "text": item}
        if not isinstance(item, Mapping) or not isinstance(item.get("text"), str) or not item["text"].strip():
            raise ValueError(f"{where}: experience #{i} needs a non-empty 'text': {item!r}")
        exp_id = str(item.get("id", f"G{i}"))
        try:
            id_number(exp_id)
        except ValueError as err:
            raise ValueError(f"{where}: experience #{i}: {err}") from err
        evidence = tuple(str(k) for k in item.get("evidence") or ())
        experiences.append(
            Experience(
                exp_id, item["text"].strip(), int(item.get("version", 0)), evidence, item.get("reason")
            )
        )
    ids = [e.id for e in experiences]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: duplicate experience ids {sorted(ids)}")
    return tuple(sorted(experiences, key=lambda e: id_number(e.id)))


def check_operation(guidance: MissionGuidance, op: Operation, touched: set[str]) -> Rejection | None:
    """Why ``op`` cannot be applied to ``guidance`` (``None`` if it can). ``touched``: ids changed this round."""
    limits = guidance.limits
    if op.op not in OPS:
        return Rejection("unknown_op", f"op must be one of {OPS}, got {op.op!r}", op)
    if op.op != "add":
        if op.id is None or guidance.get(op.id) is None:
            return Rejection(
                "unknown_id",
                f"{op.op} of {op.id!r}: no such experience (have {list(guidance.as_prompt())})",
                op,
            )
        if op.id in touched:
            return Rejection("id_touched_twice", f"{op.id} was already changed in this round", op)
    if op.op == "delete":
        return None
    text = (op.text or "").strip()
    if not text or "\n" in text or "\r" in text:
        return Rejection("bad_text", "an experience is one non-empty line", op)
    if len(text) > limits.max_chars:
        return Rejection(
            "text_too_long", f"{len(text)} characters > max_experience_chars={limits.max_chars}", op
        )
    same = next((e for e in guidance.experiences if e.text == text), None)
    if same is not None:
        return Rejection("duplicate_text", f"the same text is already {same.id}", op)
    if op.op == "add" and len(guidance.experiences) >= limits.max_experiences:
        return Rejection(
            "size_cap", f"guidance already has {limits.max_experiences} experiences (max_experiences)", op
        )
    return None


def _apply_one(guidance: MissionGuidance, op: Operation, version: int) -> tuple[MissionGuidance, Change]:
    text = (op.text or "").strip()
    if op.op == "add":
        new_id = f"G{guidance.next_id}"
        added = Experience(new_id, text, version, op.evidence, op.reason)
        return replace(
            guidance, experiences=(*guidance.experiences, added), next_id=guidance.next_id + 1
        ), Change(op, new_id, None)
    assert op.id is not None
    old = guidance.get(op.id)
    assert old is not None
    if op.op == "delete":
        kept = tuple(e for e in guidance.experiences if e.id != op.id)
        return replace(guidance, experiences=kept), Change(op, op.id, old.text)
    edited = Experience(op.id, text, version, op.evidence, op.reason)
    experiences = tuple(edited if e.id == op.id else e for e in guidance.experiences)
    return replace(guidance, experiences=experiences), Change(op, op.id, old.text)


def apply_operations(
    guidance: MissionGuidance, operations: Iterable[Operation]
) -> tuple[MissionGuidance, list[Change], list[Rejection]]:
    """Apply the valid operations in order; the version goes up by one if anything changed.

    Each operation is checked against the guidance as left by the ones before it; a rejected one is
    skipped, the others still apply.
    """
    version = guidance.version + 1
    current = guidance
    changes: list[Change] = []
    rejected: list[Rejection] = []
    touched: set[str] = set()
    for op in operations:
        problem = check_operation(current, op, touched)
        if problem is not None:
            rejected.append(problem)
            continue
        current, change = _apply_one(current, op, version)
        touched.add(change.id)
        changes.append(change)
    if changes:
        current = replace(current, version=version)
    return current, changes, rejected


def read_guidance_blocks(
    data: Any, where: str, limits: GuidanceLimits | None = None
) -> dict[str, MissionGuidance]:
    """A guidance JSON document (one mission's block, or ``{mission: block}``) -> ``{mission: guidance}``.

    The same two forms as :func:`bbuqc_lightning.stage_b.builder.load_guidance`, keeping ids and history.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: guidance must be a JSON object")
    if "experiences" in data:
        block = MissionGuidance.from_json(data, where, limits)
        return {block.mission: block}
    out: dict[str, MissionGuidance] = {}
    for mission, block in data.items():
        if not isinstance(block, Mapping):
            raise ValueError(f"{where} [{mission}]: expected an object with an 'experiences' list")
        inner = dict(block)
        if inner.setdefault("mission", mission) != mission:
            raise ValueError(f"{where}: entry {mission!r} declares mission {inner['mission']!r}")
        out[mission] = MissionGuidance.from_json(inner, f"{where} [{mission}]", limits)
    return out
