"""Score a Stage-A run's summaries against reference summaries when the run is over (SPEC §6).

Part of ``+experiment=stage_a``: after the JSONL writer has written (and, under DDP, merged) the output,
rank 0 reads it and the reference file and logs ``stage_a/object_f1`` & co. (overall and per mission,
see :mod:`bbuqc_lightning.summaries.scoring`) to every logger, to ``metrics.json`` (through
``trainer.callback_metrics``) and to ``stage_a_eval.json`` in the run folder, plus a W&B table
``stage_a/worst_lines`` of the lines furthest from their reference.

``reference_jsonl``: ``auto`` (default) scores against the synthetic ``stage_a_<split>.jsonl`` when the run
reads the embedded synthetic tree and does nothing on another tree; a path scores against that file (a
Stage-A JSONL, or a team's one-row-per-photo summary file such as a fusion ``val_jsonl``, matched by photo path);
``null`` switches scoring off. Put this callback *after* the writer in the callbacks list: teardown hooks
run in list order and the writer merges its shards in its own teardown.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from bbuqc_lightning.summaries.scoring import (
    WORST_COLUMNS,
    resolve_reference,
    score_stage_a_files,
)
from bbuqc_lightning.tracking.wandb import log_table

log = logging.getLogger(__name__)


class StageAEvaluation(Callback):
    """Scores ``output_jsonl`` against the reference at the end of a predict run (rank 0)."""

    def __init__(
        self,
        output_jsonl: str,
        reference_jsonl: str | None = "auto",
        data_root: str = "",
        synthetic_dir: str = "",
        report_json: str | None = None,
        worst_rows: int = 50,
    ) -> None:
        self.output = Path(output_jsonl)
        self.reference = resolve_reference(reference_jsonl, data_root, synthetic_dir)
        self.report_json = Path(report_json) if report_json else None
        self.worst_rows = worst_rows
        self.metrics: dict[str, float] = {}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict" or self.reference is None:
            return
        trainer.strategy.barrier("stage_a_eval_start")  # every rank's lines are merged by now
        if not trainer.is_global_zero:
            return
        if not self.reference.is_file():
            log.warning("Stage-A scoring skipped: reference %s not found", self.reference)
            return
        records = getattr(trainer.datamodule, "scanned", ())  # a per-photo summary file matches by path
        scores = score_stage_a_files(self.output, self.reference, records=records)
        if scores.groups == 0:
            log.warning("Stage-A scoring: no generated ticket has a reference in %s", self.reference)
        self.metrics = scores.metrics()
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in self.metrics.items()})
        for logger in trainer.loggers:
            logger.log_metrics(self.metrics, step=0)
        worst = [line.table_row() for line in scores.worst(self.worst_rows)]
        log_table(trainer, "stage_a/worst_lines", WORST_COLUMNS, worst)
        if self.report_json is not None:
            report = {"reference": str(self.reference), "metrics": self.metrics, "worst": worst}
            self.report_json.parent.mkdir(parents=True, exist_ok=True)
            self.report_json.write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
        log.info(
            "Stage-A vs %s: object F1 %.4f, exact match %.4f over %d images",
            self.reference, self.metrics.get("stage_a/object_f1", float("nan")),
            self.metrics.get("stage_a/exact_match", float("nan")), len(scores.lines),
        )  # fmt: skip
