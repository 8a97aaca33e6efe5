"""The training-free Stage-B runner as a LightningModule (``+experiment=stage_b_runner``; SPEC §7).

No optimiser and no gradients: what "trains" is each mission's guidance. One Lightning epoch is one
reflection round::

    training_step       K sampled answers per group under the current guidance (the one engine),
                        parsed with the Stage-B contract; every rollout -> trajectories.jsonl
    on_train_epoch_end  one selection per group (majority, ties -> 不通过) -> selections.jsonl;
                        per mission, the mistakes (label mismatch or disagreeing rollouts) go to a
                        reflection prompt whose strict JSON operations edit the guidance
                        (new version + snapshot; review mode: pending_proposals.jsonl instead);
                        metrics per epoch; trainer.should_stop once every mission converged

A mission *converges* when its reflection round applies no operation (nothing to reflect on, an empty
``operations`` list, or every proposal rejected); it is not reflected on again. The run stops when all
missions converged or after ``trainer.max_epochs`` epochs. With distillation
(``stage_b_distillation.enabled``) one more epoch, the *final rollout*, samples the (optionally
sub-sampled) groups again under the converged guidance at ``distill_temperature``, without reflection;
its selections are what ``callbacks/distillation.py`` writes. Without it, the last round's selections are
final. The final selections also fill ``manual_review_queue.jsonl`` (groups with no valid answer).

A rerun into the folder of an interrupted run (a kill, a signal) resumes it: the epoch that was cut short
is discarded whole, and the run continues with the rest of ``trainer.max_epochs``
(:mod:`~bbuqc_lightning.stage_b_runner.progress`); each epoch is seeded from ``(seed, epoch)``.

The model is kept out of the module's parameters on purpose: nothing is trained, checkpoints stay tiny,
and Lightning must not move a Teacher spread over GPUs with ``device_map="auto"``.

Commands::

    python -m bbuqc_lightning.train +experiment=stage_b_runner
    python -m bbuqc_lightning.train +experiment=stage_b_runner data.train_jsonl=/data/qc/stage_a.jsonl \\
        model=qwen3_vl_4b model.model_name_or_path=/models/Qwen3-VL-4B-Instruct trainer.max_epochs=5
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L

from bbuqc_lightning.generation.engine import GenerationEngine, SamplingParams
from bbuqc_lightning.generation.protocol import Engine
from bbuqc_lightning.models.factory import ModelBundle
from bbuqc_lightning.stage_b.metrics import verdict_metrics
from bbuqc_lightning.stage_b.prompts import as_templates
from bbuqc_lightning.stage_b.sample import StageBSample
from bbuqc_lightning.stage_b_runner import progress
from bbuqc_lightning.stage_b_runner.artifacts import (
    GUIDANCE,
    MANUAL_REVIEW,
    SELECTIONS,
    TRAJECTORIES,
    RunArtifacts,
    mission_slug,
)
from bbuqc_lightning.stage_b_runner.config import FinalRolloutConfig, RunnerConfig
from bbuqc_lightning.stage_b_runner.guidance import GuidanceLimits, MissionGuidance, read_guidance_blocks
from bbuqc_lightning.stage_b_runner.progress import RunnerProgress
from bbuqc_lightning.stage_b_runner.reflection import ReflectionTemplates
from bbuqc_lightning.stage_b_runner.reflection_round import MissionRound, reflect_missions
from bbuqc_lightning.stage_b_runner.rollout import (
    render_messages,
    rollout_groups,
    selection_row,
    trajectory_rows,
)
from bbuqc_lightning.stage_b_runner.selection import GroupResult
from bbuqc_lightning.tracking.checkpoint import seed_step
from bbuqc_lightning.tracking.wandb import log_artifact, log_table

log = logging.getLogger(__name__)


class StageBRunnerModule(L.LightningModule):
    """Prompt + guidance + reflection per mission; see the module docstring."""

    def __init__(
        self,
        bundle: ModelBundle,
        runner: RunnerConfig,
        templates: Mapping[str, Any],
        reflection_templates: Mapping[str, Any],
        final_rollout: FinalRolloutConfig | None = None,
        generation: Callable[..., Engine] | None = None,
    ) -> None:
        super().__init__()
        self.bundle = bundle  # a plain object: the model is not a submodule (see the module docstring)
        self.cfg = runner
        self.templates = as_templates(templates)
        self.reflection_templates = ReflectionTemplates.from_mapping(reflection_templates)
        self.final_cfg = final_rollout or FinalRolloutConfig()
        # the engine of conf/generation/: the local model through the pool, or an HTTP Teacher (generation=openai)
        self.engine: Engine = (generation or GenerationEngine)(bundle.model, bundle.processor)
        self.model_name = str(getattr(self.engine, "name", None) or bundle.name)
        self.limits = GuidanceLimits(runner.max_experiences, runner.max_experience_chars)
        self.initial_guidance = _read_initial(runner.initial_guidance, self.limits)
        self.run_id = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        self.artifacts = RunArtifacts(runner.output_dir, self.run_id, runner.fsync, runner.snapshot_retention)
        self.guidance: dict[str, MissionGuidance] = {}
        self.converged: dict[str, bool] = {}
        self.phase = "reflect"  # "final": the distillation rollout
        self.final_results: list[GroupResult] | None = None
        self.run_summary: dict[str, float] = {}
        self.epochs_run = 0
        self.progress: RunnerProgress | None = (
            None  # resume state (runner_progress.json), set in on_fit_start
        )
        self._cut = False  # the last epoch stopped short (a signal): it is discarded, the run not finished
        self.epoch_offset = 0
        self._results: list[GroupResult] = []
        self._final_keys: set[str] | None = None
        self.automatic_optimization = False

    # ------------------------------------------------------------------ Lightning plumbing
    def configure_optimizers(self) -> None:
        return None

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            raise ValueError(
                "the training-free runner runs in one process: set trainer.devices=1 "
                "(a Teacher too big for one GPU is spread with model.device_map=auto)"
            )
        if self.final_cfg.enabled and self._max_epochs() < 2:
            raise ValueError(
                "stage_b_distillation needs trainer.max_epochs >= 2 (reflection rounds + the final rollout)"
            )

    def on_fit_start(self) -> None:
        model = self.bundle.model
        if not getattr(model, "hf_device_map", None):  # device_map models are placed already
            model.to(self.device)
        self.progress = resumed = progress.resume_or_start(self.cfg.output_dir, self.run_id)
        self.epoch_offset = self.epochs_run = resumed.epochs_done
        self.phase = resumed.phase
        self.converged.update(resumed.converged)
        budget = self._max_epochs() if self.phase == "final" else self._reflection_budget()
        if resumed.epochs_done >= budget:
            log.warning("runner: the interrupted run had used all %d epochs; nothing left to run", budget)
            progress.finish(self.cfg.output_dir, resumed)
            self.trainer.should_stop = True

    @property
    def epoch(self) -> int:
        """This epoch's number over an interrupted run and its resume (Lightning's restarts at 0)."""
        return self.epoch_offset + self.current_epoch

    def on_exception(self, exception: BaseException) -> None:
        self.artifacts.close()

    # ------------------------------------------------------------------ rollouts
    def guidance_for(self, mission: str) -> MissionGuidance:
        """The mission's current guidance; on first use: its guidance.json, else the initial one, else empty."""
        if mission not in self.guidance:
            files = self.artifacts.mission(mission)
            loaded = files.load_guidance(self.limits) or self.initial_guidance.get(mission)
            guidance = loaded or MissionGuidance(mission, limits=self.limits)
            self.guidance[mission] = guidance
            files.save_guidance(guidance)
            self.converged.setdefault(mission, False)
        return self.guidance[mission]

    def on_train_epoch_start(self) -> None:
        self._results = []
        seed_step(self.epoch)  # an epoch samples the same whether the run was resumed or not
        if self.progress is not None:
            progress.begin_epoch(self.cfg.output_dir, self.progress)
        if self.phase == "final" and self.final_cfg.size is not None:
            self._final_keys = _sample_keys(
                self.trainer.train_dataloader, self.final_cfg.size, self.final_cfg.seed
            )

    def training_step(self, batch: list[StageBSample], batch_idx: int) -> None:
        samples = [s for s in batch if self._final_keys is None or s.ticket_key in self._final_keys]
        if not samples:
            return
        guidance = [self.guidance_for(s.mission) for s in samples]
        messages = [render_messages(s, self.templates, g) for s, g in zip(samples, guidance, strict=True)]
        versions = [g.version for g in guidance]
        results = rollout_groups(self.engine, samples, messages, self._sampling(), versions, self.epoch)
        for group in results:
            for row in trajectory_rows(group, self.phase):
                self.artifacts.mission(group.mission).append(TRAJECTORIES, row)
        self._results.extend(results)

    def _sampling(self) -> SamplingParams:
        final = self.phase == "final"
        return SamplingParams(
            max_new_tokens=self.cfg.max_new_tokens,
            do_sample=True,
            temperature=self.final_cfg.temperature if final else self.cfg.temperature,
            top_p=self.cfg.top_p,
            top_k=self.cfg.top_k,
            num_return_sequences=self.cfg.num_rollouts,
        )

    # ------------------------------------------------------------------ end of an epoch
    def on_train_epoch_end(self) -> None:
        results, phase = self._results, self.phase
        trained = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if trained < self.trainer.num_training_batches:  # stopped on a signal: discard it as a whole
            self._cut = True
            return
        self.epochs_run += 1
        for group in results:
            self.artifacts.mission(group.mission).append(SELECTIONS, selection_row(group, phase))
        metrics = _epoch_metrics(results, "train/")
        if phase == "final":
            self._finish(results)
        else:
            rounds = self._reflect(results)
            metrics.update(_reflection_metrics(rounds))
            if all(self.converged.values()) or self.epoch + 1 >= self._reflection_budget():
                self._end_reflection(results)
        metrics.update(self._guidance_metrics())
        metrics["runner/final_rollout"] = float(phase == "final")
        self.log_dict(metrics)
        self._log_selection_table(results)
        if self.progress is not None:
            progress.end_epoch(self.cfg.output_dir, self.progress, self.epoch + 1, self.phase, self.converged)

    def _reflect(self, results: list[GroupResult]) -> list[MissionRound]:
        by_mission: dict[str, list[GroupResult]] = defaultdict(list)
        for group in results:
            by_mission[group.mission].append(group)
        active = {m: groups for m, groups in by_mission.items() if not self.converged.get(m)}
        rounds = reflect_missions(
            self.engine,
            {m: self.guidance_for(m) for m in active},
            active,
            self.templates,
            self.reflection_templates,
            self.cfg,
            reflection_id=f"{self.run_id}/epoch{self.epoch}",
        )
        for r in rounds:
            files = self.artifacts.mission(r.mission)
            for name, row in r.rows:
                files.append(name, {"epoch": self.epoch, **row})
            if r.guidance.version != self.guidance[r.mission].version:
                self.guidance[r.mission] = r.guidance
                files.save_guidance(r.guidance)
            self.converged[r.mission] = not r.applied
            log.info(
                "reflection %s epoch %d: %d proposed, %d applied, %d pending, %d rejected%s -> guidance v%d (%d)",
                r.mission, self.epoch, r.proposed, len(r.applied), r.pending, r.rejected,
                " (answer invalid)" if r.invalid_output else "", r.guidance.version, len(r.guidance.experiences),
            )  # fmt: skip
        return rounds

    def _end_reflection(self, results: list[GroupResult]) -> None:
        """Last reflection round done: run the final rollout next, or finish with this epoch's selections."""
        if self.final_cfg.enabled:
            self.phase = "final"
        else:
            self._finish(results)

    def _finish(self, results: list[GroupResult]) -> None:
        self.final_results = results
        self.trainer.should_stop = True

    # ------------------------------------------------------------------ end of the run
    def on_train_end(self) -> None:
        if self._cut or self.final_results is None:  # interrupted: the rerun resumes; keep the last queue
            self.artifacts.close()
            return
        results = self.final_results
        self._write_manual_review(results)
        for mission in self.guidance:
            path = self.artifacts.mission(mission).path(GUIDANCE)
            log_artifact(self.trainer, path, f"guidance-{mission_slug(mission)}", "guidance")
        self.run_summary.update(
            {
                "runner/epochs": float(self.epochs_run),
                "runner/missions": float(len(self.converged)),
                "runner/converged_missions": float(sum(self.converged.values())),
                "runner/converged": float(bool(self.converged) and all(self.converged.values())),
                "runner/manual_review": float(sum(g.selection.verdict is None for g in results)),
                **_epoch_metrics(results, "final/"),
            }
        )
        self.artifacts.close()
        if self.progress is not None:
            progress.finish(self.cfg.output_dir, self.progress)
        log.info("training-free runner: artifacts in %s", Path(self.cfg.output_dir).resolve())

    def _write_manual_review(self, results: list[GroupResult]) -> None:
        rows: dict[str, list[dict[str, Any]]] = {m: [] for m in self.guidance}
        for g in results:
            if g.selection.verdict is None:
                errors = sorted({c.error or "" for c in g.candidates})
                rows[g.mission].append(
                    {"run_id": self.run_id, "ticket_key": g.ticket_key, "group_id": g.sample.group_id,
                     "mission": g.mission, "label": g.label, "epoch": g.epoch,
                     "reason": "no valid answer among the rollouts: " + "; ".join(errors),
                     "raw_texts": [c.text for c in g.candidates]}
                )  # fmt: skip
        for mission, mission_rows in rows.items():
            self.artifacts.mission(mission).replace(MANUAL_REVIEW, mission_rows)

    # ------------------------------------------------------------------ helpers
    def _max_epochs(self) -> float:
        max_epochs = self.trainer.max_epochs
        return float("inf") if max_epochs is None or max_epochs < 0 else float(max_epochs)

    def _reflection_budget(self) -> float:
        """Epochs available for reflection rounds (the final rollout takes the last one)."""
        return self._max_epochs() - (1 if self.final_cfg.enabled else 0)

    def _guidance_metrics(self) -> dict[str, float]:
        metrics = {"guidance/size": float(sum(len(g.experiences) for g in self.guidance.values()))}
        for mission, g in self.guidance.items():
            slug = mission_slug(mission)
            metrics[f"guidance/size/{slug}"] = float(len(g.experiences))
            metrics[f"guidance/version/{slug}"] = float(g.version)
        metrics["runner/converged_missions"] = float(sum(self.converged.values()))
        return metrics

    def _log_selection_table(self, results: list[GroupResult]) -> None:
        rows = [
            [g.epoch, g.mission, g.ticket_key, g.label, g.selection.verdict, g.selection.vote_strength,
             g.selected.answer if g.selected else g.candidates[0].text]
            for g in results[: self.cfg.num_table_samples]
        ]  # fmt: skip
        columns = ["epoch", "mission", "ticket_key", "label", "verdict", "vote_strength", "answer"]
        log_table(self.trainer, "train/selections", columns, rows)


def _epoch_metrics(results: list[GroupResult], prefix: str) -> dict[str, float]:
    """SPEC §6 rates of the selected answers, plus the rollouts' own format rate."""
    if not results:
        return {}
    metrics = verdict_metrics(
        [g.selection.verdict for g in results],
        [g.label for g in results],
        [g.mission for g in results],
        [g.selection.verdict is not None for g in results],
        prefix=prefix,
    )
    rollouts = [c.valid for g in results for c in g.candidates]
    metrics[f"{prefix}rollout_format_valid_rate"] = sum(rollouts) / len(rollouts)
    return metrics


def _reflection_metrics(rounds: list[MissionRound]) -> dict[str, float]:
    names = ("proposed", "applied", "pending", "rejected", "invalid_outputs")
    metrics = dict.fromkeys((f"reflection/{n}" for n in names), 0.0)
    for r in rounds:
        values = (r.proposed, len(r.applied), r.pending, r.rejected, int(r.invalid_output))
        slug = mission_slug(r.mission)
        for name, value in zip(names, values, strict=True):
            metrics[f"reflection/{name}"] += value
            metrics[f"reflection/{name}/{slug}"] = float(value)
    return metrics


def _read_initial(path: str | None, limits: GuidanceLimits) -> dict[str, MissionGuidance]:
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"module.runner.initial_guidance: no such file {file}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    return read_guidance_blocks(data, str(file), limits)


def _sample_keys(loader: Any, size: int, seed: int) -> set[str]:
    """``size`` ticket keys per mission, drawn with ``seed`` from the train loader's samples."""
    by_mission: dict[str, list[str]] = defaultdict(list)
    for sample in loader.dataset:
        by_mission[sample.mission].append(sample.ticket_key)
    rng = random.Random(seed)
    keys: set[str] = set()
    for mission in sorted(by_mission):
        pool = sorted(by_mission[mission])
        keys.update(rng.sample(pool, min(size, len(pool))))
    return keys
