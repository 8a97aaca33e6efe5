"""End-to-end evaluation (``+experiment=e2e``): what production does with one resident model.

For each batch of held-out tickets (photos, from :class:`~bbuqc_lightning.e2e.datamodule.E2EDataModule`):

1. the model writes one Stage-A summary per photo (greedy, one line, the mission's prompt), and the
   ticket's SPEC §4 line goes to ``stage_a.jsonl`` in the run folder;
2. the same model reads those summaries in the Stage-B prompt (with the optional guidance) and answers
   greedily; the answers are scored against the SPEC §5 contract and the ticket's label.

Logged (``metrics.json``, every logger): the SPEC §6 verdict metrics under ``e2e/`` (``e2e/false_pass_rate``,
``e2e/false_fail_rate``, ``e2e/accuracy``, ``e2e/format_valid_rate``, ``e2e/invalid_rate``, each also
``/<slug>``), ``e2e/groups``, ``e2e/manual_review``; where reference summaries exist (the synthetic tree, or
``module.reference_jsonl``) the Stage-A scores ``stage_a/object_f1`` & co. of the same summaries; W&B tables
``e2e/predictions`` and ``stage_a/worst_lines``. Files: ``stage_a.jsonl``, ``predictions.jsonl``,
``manual_review_queue.jsonl``, ``failure_malformed.jsonl``, ``confusion/``, ``e2e_eval.json``.

Commands::

    python -m bbuqc_lightning.train +experiment=e2e                                   # tiny model, CPU
    python -m bbuqc_lightning.train +experiment=e2e model.random_init=false model.model_name_or_path=<run>/model
    python -m bbuqc_lightning.train +experiment=e2e model=qwen3_vl_4b trainer=gpu \\
        model.model_name_or_path=/models/Qwen3-VL-4B-Instruct module.adapter_path=<run>/adapter \\
        data.root=/data/qc/test module.reference_jsonl=/data/qc/summary_test.jsonl

One device (like ``+experiment=eval``): a distributed sampler would repeat tickets.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L

from bbuqc_lightning.constants import MISSIONS
from bbuqc_lightning.data.jsonl import JsonlAppender
from bbuqc_lightning.generation.engine import GenerationEngine, SamplingParams, line_break_token_ids
from bbuqc_lightning.models.factory import ModelBundle
from bbuqc_lightning.models.lora import attach_adapter
from bbuqc_lightning.stage_b.builder import build_stage_b_samples, load_guidance
from bbuqc_lightning.stage_b.evaluation import generate_greedy
from bbuqc_lightning.stage_b.report import TABLE_COLUMNS, EvalReport
from bbuqc_lightning.summaries.records import build_stage_a_record, clean_summary, normalise_stage_a_record
from bbuqc_lightning.summaries.scoring import WORST_COLUMNS, StageAScores, read_reference, resolve_reference
from bbuqc_lightning.tracking.wandb import log_images, log_table

PREFIX = "e2e/"
STAGE_A_JSONL = "stage_a.jsonl"
REPORT_JSON = "e2e_eval.json"


class E2EModule(L.LightningModule):
    """Photos -> own summaries -> own verdicts; see the module docstring."""

    def __init__(
        self,
        bundle: ModelBundle,
        output_dir: str,
        templates: Mapping[str, Any],
        guidance_path: str | None = None,
        reference_jsonl: str | None = "auto",
        data_root: str = "",
        synthetic_dir: str = "",
        adapter_path: str | None = None,
        merge_adapter: bool = True,
        stage_a_max_new_tokens: int = 128,
        max_new_tokens: int = 128,
        max_prompt_tokens: int | None = 2048,
        missions: Mapping[str, str] | None = None,
        table_rows: int | None = None,
        worst_rows: int = 50,
        fsync: bool = True,
        generation: Callable[..., GenerationEngine] | None = None,
    ) -> None:
        super().__init__()
        if bundle.kind != "vl":
            raise ValueError(f"end-to-end evaluation needs a vision-language model, got {bundle.kind!r}")
        model = bundle.model
        if adapter_path:
            model = attach_adapter(model, adapter_path, merge=merge_adapter)
        model.eval()
        self.model = model
        self.tokenizer = bundle.tokenizer
        self.engine = (generation or GenerationEngine)(
            model, bundle.processor
        )  # the one engine (conf/generation/)
        self.summary_sampling = SamplingParams(
            max_new_tokens=stage_a_max_new_tokens, suppress_token_ids=line_break_token_ids(bundle.tokenizer)
        )
        self.verdict_sampling = SamplingParams(max_new_tokens=max_new_tokens)
        self.templates = dict(templates)
        self.guidance = load_guidance(guidance_path) if guidance_path else None
        self.reference_path = resolve_reference(reference_jsonl, data_root, synthetic_dir)
        self.max_prompt_tokens = max_prompt_tokens
        self.output_dir = Path(output_dir)
        self.missions = dict(missions or MISSIONS)
        self.table_rows = table_rows
        self.worst_rows = worst_rows
        self.fsync = fsync
        self.report: EvalReport | None = None
        self.scores = StageAScores(self.missions)
        self._reference: dict[str, dict[str, Any]] = {}
        self._stage_a: JsonlAppender | None = None
        self._seconds = {"stage_a": 0.0, "stage_b": 0.0}

    def on_test_start(self) -> None:
        if self.trainer.world_size > 1:
            raise ValueError("end-to-end evaluation runs on one device (trainer.devices=1)")
        self.report = EvalReport(
            self.output_dir, self.missions, prefix=PREFIX, fsync=self.fsync, table_rows=self.table_rows
        )
        self.scores = StageAScores(self.missions)
        if self.reference_path is not None and self.reference_path.is_file():
            records = getattr(self.trainer.datamodule, "records", ())
            self._reference = read_reference(self.reference_path, records)
        self._stage_a = JsonlAppender(self.output_dir / STAGE_A_JSONL, fsync=self.fsync)
        (self.output_dir / STAGE_A_JSONL).unlink(missing_ok=True)  # an evaluation starts afresh
        self._stage_a.open()

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        assert self.report is not None and self._stage_a is not None, "on_test_start opens them"
        lines = self._summarise(batch)
        records = [normalise_stage_a_record(line) for line in lines]
        samples, _ = build_stage_b_samples(
            records, self.templates, self.guidance, self.tokenizer, self.max_prompt_tokens, strict=True
        )
        start = time.perf_counter()
        texts, truncated = generate_greedy(self.engine, samples, self.verdict_sampling)
        self._seconds["stage_b"] += time.perf_counter() - start
        self.report.add(samples, texts, truncated)

    def _summarise(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every photo of the batch in one generation call -> one SPEC §4 line per ticket (written)."""
        conversations = [t["conversation"] for t in batch for _ in t["images"]]
        images = [[image] for t in batch for image in t["images"]]
        start = time.perf_counter()
        outputs = iter(self.engine.generate(conversations, self.summary_sampling, images=images))
        self._seconds["stage_a"] += time.perf_counter() - start
        lines = []
        for ticket in batch:
            record = ticket["record"]
            summaries = []
            for path in record.image_paths:
                raw = next(outputs)[0].text
                summary = clean_summary(raw)
                if not summary:
                    raise ValueError(
                        f"empty Stage-A summary for group {record.ticket_key} image {path.name} (raw {raw!r})"
                    )
                summaries.append(summary)
            line = build_stage_a_record(record, summaries)
            self._stage_a.append(line)
            lines.append(line)
            reference = self._reference.get(record.ticket_key)
            if reference is not None:
                self.scores.add_group(
                    record.ticket_key, record.mission, reference["per_image"], line["per_image"]
                )
            elif self._reference:
                self.scores.unreferenced_groups += 1
        return lines

    def on_test_epoch_end(self) -> None:
        assert self.report is not None
        result = self.report.finish()
        groups = result.counts["predictions"]
        metrics = {
            **result.metrics,
            f"{PREFIX}groups": float(groups),
            f"{PREFIX}manual_review": float(result.counts["manual_review"]),
            f"{PREFIX}stage_a_seconds": self._seconds["stage_a"],
            f"{PREFIX}stage_b_seconds": self._seconds["stage_b"],
        }
        if self._reference:
            self.scores.missing_groups = len(set(self._reference) - {s.ticket_key for s in self.scores.lines})
            metrics.update(self.scores.metrics())
        self.log_dict(metrics)
        log_table(self.trainer, f"{PREFIX}predictions", TABLE_COLUMNS, self.report.rows)
        worst = [line.table_row() for line in self.scores.worst(self.worst_rows)]
        log_table(self.trainer, "stage_a/worst_lines", WORST_COLUMNS, worst)
        log_images(self.trainer, {f"{PREFIX}confusion/{name}": path for name, path in result.images.items()})
        report = {"reference": str(self.reference_path) if self._reference else None, "metrics": metrics}
        (self.output_dir / REPORT_JSON).write_text(
            json.dumps({**report, "worst_stage_a_lines": worst}, ensure_ascii=False, indent=2),
            encoding="utf-8",
        )

    def teardown(self, stage: str) -> None:
        if self._stage_a is not None:
            self._stage_a.close()
        if self.report is not None:
            self.report.close()
