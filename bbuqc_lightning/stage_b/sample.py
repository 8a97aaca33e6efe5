"""One Stage-B sample (SPEC §5) as it travels through the code: builder -> DataModule -> GRPO / eval / runner.

In code every field has one name: the mission is ``mission``, the human label ``label``. On disk and in
TRL datasets a sample keeps SPEC §5's keys (``task_type``, ``group_label``), the names the team's existing
files and TRL reward columns use; :meth:`StageBSample.reward_columns` is the one place that maps one to
the other, and :meth:`StageBSample.to_json` (the SPEC §5 JSON object) is built on it.

Example::

    >>> s = StageBSample(messages=[{"role": "user", "content": "…"}], group_id="QC-A-20250101-1",
    ...                  ticket_key="QC-A-20250101-1::fail", mission="BBU接地线检查", label="fail",
    ...                  summaries=["螺丝/未拧紧×1"])
    >>> s.reward_columns()["group_label"], s.to_json()["task_type"]
    ('fail', 'BBU接地线检查')
    >>> sorted(s.to_json())
    ['group_id', 'group_label', 'messages', 'summaries', 'task_type', 'ticket_key']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Label = Literal["pass", "fail"]


# Not frozen: Lightning's default batch transfer (a module fed by a plain DataLoader) rebuilds dataclasses
# field by field and refuses frozen ones.
@dataclass
class StageBSample:
    """A group's Stage-B prompt and what is known about it (text only; no images)."""

    messages: list[dict[str, str]]  # system + user, as rendered by the builder
    group_id: str
    ticket_key: str  # "<group_id>::<label>": identifies the record everywhere
    mission: str  # exact mission string (SPEC §1)
    label: Label | None  # the human label; None for unlabelled (inference-only) groups
    summaries: list[str] = field(default_factory=list)  # 图片_1.. summaries, in image order

    def reward_columns(self) -> dict[str, Any]:
        """The dataset columns TRL passes to reward functions (SPEC §5 keys), one value each.

        ``group_label`` and ``summaries`` are what :mod:`bbuqc_lightning.stage_b.rewards` reads; a TRL
        dataset row is ``{"prompt": sample.messages, **sample.reward_columns()}``.
        """
        return {
            "group_id": self.group_id,
            "ticket_key": self.ticket_key,
            "task_type": self.mission,
            "group_label": self.label,
            "summaries": list(self.summaries),
        }

    def to_json(self) -> dict[str, Any]:
        """The SPEC §5 JSON object (what a Stage-B sample JSONL line holds)."""
        return {"messages": [dict(m) for m in self.messages], **self.reward_columns()}


def reward_columns(samples: Sequence[StageBSample]) -> dict[str, list[Any]]:
    """Column-wise :meth:`StageBSample.reward_columns` of ``samples``: the keyword lists TRL hands a reward."""
    rows = [s.reward_columns() for s in samples]
    return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}
