"""Write the Teacher's final answers as chatml SFT data: ``<mission folder>/distill_chatml.jsonl`` (SPEC §8).

At the end of a training-free run with distillation (``+experiment=distill``, ``tools/distill.py``) the
runner holds the selections of its *final rollout* under the converged guidance (``module.final_results``);
this callback turns them into rows (:mod:`bbuqc_lightning.stage_b_runner.distill`: schema and conflict
policies ``drop`` | ``flip`` | ``mark``) and replaces each mission's file atomically (a crash mid-write
leaves the previous file intact). Counts go to the run summary (``metrics.json``): ``distill/rows``,
``distill/conflicts``, ``distill/dropped``, ``distill/flipped``, ``distill/marked``,
``distill/invalid_skipped``, and ``distill/rows/<mission slug>``. Nothing is written when the run did not
reach its final rollout (an exception, an interrupt).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from bbuqc_lightning.constants import MISSIONS
from bbuqc_lightning.stage_b_runner.distill import POLICIES, build_distill_rows, write_distill_file
from bbuqc_lightning.tracking.wandb import log_artifact

log = logging.getLogger(__name__)


class DistillationCallback(Callback):
    """Writes ``distill_chatml.jsonl`` per mission from ``pl_module.final_results`` at the end of training."""

    def __init__(
        self,
        enabled: bool = True,
        filename: str = "distill_chatml.jsonl",
        conflict_policy: str = "mark",
        conflict_weight: float = 0.5,
        fsync: bool = True,
    ) -> None:
        if conflict_policy not in POLICIES:
            raise ValueError(
                f"stage_b_distillation.conflict_policy must be one of {POLICIES}, got {conflict_policy!r}"
            )
        if not 0.0 <= conflict_weight <= 1.0:
            raise ValueError(f"stage_b_distillation.conflict_weight must be in [0, 1], got {conflict_weight}")
        self.enabled = enabled
        self.filename = filename
        self.conflict_policy = conflict_policy
        self.conflict_weight = conflict_weight
        self.fsync = fsync
        self.written: dict[str, Path] = {}
        self.counts: Counter[str] = Counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        results = getattr(pl_module, "final_results", None)
        if results is None:
            log.warning(
                "distillation: the run ended before its final rollout; no file written, old files kept"
            )
            return
        rows, self.counts = build_distill_rows(
            results, self.conflict_policy, self.conflict_weight, _meta(pl_module)
        )
        summary = {
            f"distill/{k}": float(self.counts[k]) for k in ("conflicts", "dropped", "flipped", "marked")
        }
        summary["distill/invalid_skipped"] = float(self.counts["invalid"])
        summary["distill/rows"] = float(sum(len(r) for r in rows.values()))
        for mission, mission_rows in rows.items():
            path = pl_module.artifacts.mission(mission).path(self.filename)
            write_distill_file(path, mission_rows, fsync=self.fsync)
            self.written[mission] = path
            summary[f"distill/rows/{MISSIONS[mission]}"] = float(len(mission_rows))
            log_artifact(trainer, path, f"distill-{MISSIONS[mission]}", "dataset")
            log.info("distillation: %d conversations -> %s", len(mission_rows), path)
        pl_module.run_summary.update(summary)


def _meta(pl_module: Any) -> dict[str, Any]:
    """Where the answers came from (SPEC §8): the final rollout's size, seed and temperature, and the Teacher."""
    final = pl_module.final_cfg
    return {
        "distill_size": final.size if final.enabled else None,
        "distill_seed": final.seed if final.enabled else None,
        "distill_temperature": final.temperature if final.enabled else pl_module.cfg.temperature,
        "teacher": pl_module.model_name,
    }
