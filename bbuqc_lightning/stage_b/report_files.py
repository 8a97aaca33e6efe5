"""The eval run's JSONL outputs, streamed one line per group as answers come in (SPEC §5).

In the run folder:

- ``predictions.jsonl``: every group — ``ticket_key``, ``group_id``, ``mission``, ``label``, ``output``
  (raw answer), ``verdict`` (``"pass"``/``"fail"``/``null``), ``reason``, ``valid``, ``error``, ``truncated``;
- ``manual_review_queue.jsonl``: every *invalid* answer, for a person to judge — ``ticket_key``,
  ``group_id``, ``mission``, ``label``, ``reason`` (the contract violation), ``source: "eval"``;
- ``failure_malformed.jsonl``: the same groups with the raw text kept — ``ticket_key``, ``mission``,
  ``error``, ``truncated``, ``raw_output``.

Each line is written, flushed (and fsynced) as soon as its batch is scored, so a run killed halfway
leaves every finished group on disk. A new eval starts its files afresh: an eval is not resumable (it is
cheap to rerun, and mixing answers of two runs would corrupt the rates).

Example::

    with EvalArtifacts("outputs/eval/runs/x") as out:
        out.write(score_outputs(samples, texts))
    out.counts  # {"predictions": 16, "manual_review": 3}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bbuqc_lightning.data.jsonl import JsonlAppender, OpenCloseContext
from bbuqc_lightning.stage_b.evaluation import ScoredAnswer

PREDICTIONS = "predictions.jsonl"
MANUAL_REVIEW = "manual_review_queue.jsonl"
MALFORMED = "failure_malformed.jsonl"


def prediction_row(answer: ScoredAnswer) -> dict[str, Any]:
    """The ``predictions.jsonl`` line of one group."""
    return {
        "ticket_key": answer.ticket_key,
        "group_id": answer.group_id,
        "mission": answer.mission,
        "label": answer.label,
        "output": answer.output,
        "verdict": answer.verdict,
        "reason": answer.reason,
        "valid": answer.valid,
        "error": answer.error,
        "truncated": answer.truncated,
    }


def review_row(answer: ScoredAnswer, source: str = "eval") -> dict[str, Any]:
    """The ``manual_review_queue.jsonl`` line of one invalid answer: which group, and why."""
    return {
        "ticket_key": answer.ticket_key,
        "group_id": answer.group_id,
        "mission": answer.mission,
        "label": answer.label,
        "reason": answer.error,
        "source": source,
    }


def malformed_row(answer: ScoredAnswer) -> dict[str, Any]:
    """The ``failure_malformed.jsonl`` line of one invalid answer: the raw text a person reads."""
    return {
        "ticket_key": answer.ticket_key,
        "mission": answer.mission,
        "error": answer.error,
        "truncated": answer.truncated,
        "raw_output": answer.output,
    }


class EvalArtifacts(OpenCloseContext):
    """Streams :func:`prediction_row` for every answer and routes invalid ones to review + malformed."""

    def __init__(self, output_dir: str | Path, fsync: bool = True, source: str = "eval") -> None:
        self.output_dir = Path(output_dir)
        self.fsync = fsync
        self.source = source
        self.counts = {"predictions": 0, "manual_review": 0}
        self._files: dict[str, JsonlAppender] = {}

    @property
    def paths(self) -> dict[str, Path]:
        return {name: self.output_dir / name for name in (PREDICTIONS, MANUAL_REVIEW, MALFORMED)}

    def open(self) -> None:
        """Start the three files empty (idempotent while open)."""
        if self._files:
            return
        for name, path in self.paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")  # an empty review queue is a result too: nothing to review
            self._files[name] = JsonlAppender(path, fsync=self.fsync, repair=False)
            self._files[name].open()

    def write(self, answers: Sequence[ScoredAnswer]) -> None:
        """Append one batch of answers (opens the files on first use)."""
        self.open()
        for answer in answers:
            self._files[PREDICTIONS].append(prediction_row(answer))
            self.counts["predictions"] += 1
            if not answer.valid:
                self._files[MANUAL_REVIEW].append(review_row(answer, self.source))
                self._files[MALFORMED].append(malformed_row(answer))
                self.counts["manual_review"] += 1

    def close(self) -> None:
        for appender in self._files.values():
            appender.close()
        self._files = {}
