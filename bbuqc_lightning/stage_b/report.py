"""Everything an eval run derives from (sample, answer text) pairs: metrics, confusion matrices, files.

:class:`EvalReport` is fed batch by batch — by :class:`~bbuqc_lightning.eval.module.EvalModule` with the
model's greedy answers, or by :func:`evaluate_outputs` with answers from anywhere (a saved run, another
system, a hand-built test set) — and every batch goes through the same steps: parse against the SPEC §5
contract (:func:`~bbuqc_lightning.stage_b.evaluation.score_outputs`), count verdicts overall and per
mission (``test/false_pass_rate``, ``test/false_pass_rate/<slug>``, ...), count the confusion matrices,
and stream ``predictions.jsonl`` / ``manual_review_queue.jsonl`` / ``failure_malformed.jsonl``.
:meth:`EvalReport.finish` closes the files, draws ``confusion/<slug>.png`` and writes ``confusion.json``.

Example (score answers that were produced elsewhere)::

    result = evaluate_outputs(samples, texts, "outputs/eval/manual")
    result.metrics["test/false_pass_rate"], result.images["bbu_grounding"]
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bbuqc_lightning.constants import MISSIONS
from bbuqc_lightning.stage_b.confusion import ConfusionCounts
from bbuqc_lightning.stage_b.evaluation import (
    ScoredAnswer,
    score_outputs,
    summaries_text,
    update_verdict_metrics,
)
from bbuqc_lightning.stage_b.metrics import VerdictMetrics
from bbuqc_lightning.stage_b.report_files import EvalArtifacts
from bbuqc_lightning.stage_b.sample import StageBSample

# The W&B table of every group: what the model read, what it said, how it was read, what it should say.
TABLE_COLUMNS: tuple[str, ...] = (
    "ticket_key",
    "mission",
    "label",
    "summaries",
    "output",
    "verdict",
    "valid",
    "error",
)
CONFUSION_DIR = "confusion"
CONFUSION_JSON = "confusion.json"
UNKNOWN_MISSION = "other"  # confusion name of a mission outside the configured four


@dataclass
class EvalResult:
    """What :meth:`EvalReport.finish` returns: rates (floats), counts, and the confusion PNGs by name."""

    metrics: dict[str, float]
    counts: dict[str, int]
    images: dict[str, Path] = field(default_factory=dict)


class EvalReport:
    """Accumulates one eval run; see the module docstring. ``prefix`` is the metric key prefix."""

    def __init__(
        self,
        output_dir: str | Path,
        missions: Mapping[str, str] = MISSIONS,
        prefix: str = "test/",
        fsync: bool = True,
        table_rows: int | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.missions = dict(missions)
        self.metric = VerdictMetrics(prefix, self.missions)
        self.confusion = ConfusionCounts()
        self.artifacts = EvalArtifacts(self.output_dir, fsync=fsync)
        self.table_rows = table_rows
        self.rows: list[list[Any]] = []

    def add(
        self,
        samples: Sequence[StageBSample],
        outputs: Sequence[str],
        truncated: Sequence[bool] | None = None,
    ) -> list[ScoredAnswer]:
        """Score one batch of answers and record it everywhere (files are written before returning)."""
        answers = score_outputs(samples, outputs, truncated)
        update_verdict_metrics(self.metric, answers)
        for answer in answers:
            name = self.missions.get(answer.mission, UNKNOWN_MISSION)
            self.confusion.add(name, answer.label, answer.verdict, answer.valid)
        self.artifacts.write(answers)
        room = len(answers) if self.table_rows is None else max(self.table_rows - len(self.rows), 0)
        self.rows.extend(_table_row(a) for a in answers[:room])
        return answers

    def finish(self) -> EvalResult:
        """Close the JSONL files, draw the confusion matrices, and return the rates and counts."""
        self.artifacts.close()
        metrics = {key: float(value) for key, value in self.metric.compute().items()}
        images = self.confusion.save_pngs(self.output_dir / CONFUSION_DIR) if self.confusion.tables else {}
        (self.output_dir / CONFUSION_JSON).write_text(
            json.dumps(self.confusion.as_dict(), indent=2, ensure_ascii=False), encoding="utf-8"
        )
        return EvalResult(metrics=metrics, counts=dict(self.artifacts.counts), images=images)

    def close(self) -> None:
        """Close the files without drawing anything (after a failure)."""
        self.artifacts.close()


def _table_row(answer: ScoredAnswer) -> list[Any]:
    values = {"summaries": summaries_text(answer.summaries)}
    return [values[c] if c in values else getattr(answer, c) for c in TABLE_COLUMNS]


def evaluate_outputs(
    samples: Sequence[StageBSample],
    outputs: Sequence[str],
    output_dir: str | Path,
    **report_kwargs: Any,
) -> EvalResult:
    """Score ready-made answers exactly as an eval run scores the model's: one batch, then finish."""
    report = EvalReport(output_dir, **report_kwargs)
    report.add(samples, outputs)
    return report.finish()
