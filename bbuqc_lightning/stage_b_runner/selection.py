"""Pick one answer per group from its K rollouts: the majority verdict among the valid ones.

Decisions (SPEC §7):

1. Only valid answers vote (an answer that breaks the two-line contract is never a pass).
2. A tie between 通过 and 不通过 selects 不通过: a wrong fail costs a second look, a wrong pass is a
   误放行.
3. No valid answer: the group's selection is *invalid* (``verdict is None``); it goes to the manual
   review queue and counts in ``invalid_rate``.
4. The selected candidate is the first rollout with the selected verdict (deterministic).
5. ``vote_strength`` is the selected verdict's share of all K rollouts (invalid ones included, so a
   2-of-4 majority with two invalid answers reads 0.5, not 1.0); 0.0 for an invalid selection.
6. ``disagreement``: the K rollouts do not all give the same answer (invalid counts as an answer).

Example::

    >>> c = [Candidate(0, "x", None, False, "line_count: …", None), Candidate(1, "y", "pass", True, None, "好")]
    >>> s = select_candidate(c)
    >>> s.verdict, s.index, s.vote_strength, s.disagreement
    ('pass', 1, 0.5, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bbuqc_lightning.stage_b.contract import parse_verdict, strip_think
from bbuqc_lightning.stage_b.sample import Label, StageBSample


@dataclass(frozen=True)
class Candidate:
    """One rollout of one group, parsed with the Stage-B contract."""

    index: int
    text: str  # raw model output (think block included)
    verdict: Label | None
    valid: bool
    error: str | None
    reason: str | None
    truncated: bool = False

    @classmethod
    def parse(cls, index: int, text: str, summaries: Sequence[str], truncated: bool = False) -> Candidate:
        parsed = parse_verdict(text, summaries)
        return cls(index, text, parsed.verdict, parsed.valid, parsed.error, parsed.reason, truncated)

    @property
    def answer(self) -> str:
        """The two-line answer without the think block (what a student should learn to write)."""
        body = strip_think(self.text)
        return (body if body is not None else self.text).strip()


@dataclass(frozen=True)
class Selection:
    """The selected answer of one group in one epoch."""

    verdict: Label | None
    index: int | None
    vote_strength: float
    votes: dict[str, int]
    disagreement: bool


def select_candidate(candidates: Sequence[Candidate]) -> Selection:
    """Majority verdict among valid candidates; ties -> fail; none valid -> invalid selection."""
    if not candidates:
        raise ValueError("select_candidate needs at least one candidate")
    votes = {"pass": 0, "fail": 0, "invalid": 0}
    for c in candidates:
        votes[c.verdict if c.valid and c.verdict else "invalid"] += 1
    disagreement = sum(1 for n in votes.values() if n) > 1
    if votes["pass"] == votes["fail"] == 0:
        return Selection(None, None, 0.0, votes, disagreement)
    verdict: Label = "pass" if votes["pass"] > votes["fail"] else "fail"
    index = next(c.index for c in candidates if c.valid and c.verdict == verdict)
    return Selection(verdict, index, votes[verdict] / len(candidates), votes, disagreement)


@dataclass
class GroupResult:
    """One group's rollout and selection in one epoch (what artifacts, reflection and distillation read)."""

    sample: StageBSample
    messages: list[dict[str, str]]  # system + user exactly as prompted (current guidance)
    guidance_version: int
    epoch: int
    candidates: list[Candidate]
    selection: Selection

    @property
    def mission(self) -> str:
        return self.sample.mission

    @property
    def ticket_key(self) -> str:
        return self.sample.ticket_key

    @property
    def label(self) -> Label | None:
        return self.sample.label

    @property
    def label_match(self) -> bool | None:
        """Selected verdict equals the human label (``None`` when unlabelled; an invalid selection is False)."""
        return None if self.label is None else self.selection.verdict == self.label

    @property
    def conflict_flag(self) -> bool:
        """A *valid* selected verdict that contradicts the human label (invalid ones go to manual review)."""
        return (
            self.label is not None
            and self.selection.verdict is not None
            and self.selection.verdict != self.label
        )

    @property
    def is_mistake(self) -> bool:
        """What reflection looks at: label mismatch (invalid included) or rollouts that disagree."""
        return self.label_match is False or self.selection.disagreement

    @property
    def selected(self) -> Candidate | None:
        return None if self.selection.index is None else self.candidates[self.selection.index]
