"""Stage-B evaluation as a LightningModule for ``trainer.test`` (``+experiment=eval``).

Reads a labelled Stage-A JSONL (``data.test_jsonl``) through the Stage-B DataModule (optionally with a
guidance file, ``data.guidance_path``), answers every group greedily through the shared generation
engine — with the base model or the base model plus a LoRA adapter (``module.adapter_path``, the
``adapter/`` folder a GRPO or fusion SFT run writes) — and reports:

- ``test/false_pass_rate``, ``test/false_fail_rate``, ``test/accuracy``, ``test/format_valid_rate``,
  ``test/invalid_rate``, each also as ``.../<mission slug>``, plus ``test/groups``, ``test/manual_review``,
  ``test/groups_per_s`` (all in the run folder's ``metrics.json`` and W&B);
- a W&B table ``test/predictions`` of every group (summaries, output, parsed verdict, label);
- a confusion matrix per mission (and ``all``): ``confusion/<slug>.png`` in the run folder and W&B
  images ``test/confusion/<slug>``; counts in ``confusion.json``;
- ``predictions.jsonl``, ``manual_review_queue.jsonl``, ``failure_malformed.jsonl`` streamed per batch
  (:mod:`bbuqc_lightning.eval.artifacts`).

Commands::

    python -m bbuqc_lightning.train +experiment=eval                       # tiny model, synthetic test set
    python -m bbuqc_lightning.train +experiment=eval model=qwen3_vl_4b trainer=gpu \\
        model.model_name_or_path=/models/Qwen3-VL-4B-Instruct \\
        module.adapter_path=outputs/grpo/runs/<run>/adapter \\
        data.test_jsonl=/data/qc/stage_a_test.jsonl data.guidance_path=/data/qc/guidance.json

Evaluation runs on one device: a distributed sampler pads the set with repeated groups, which would
count some groups twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

import lightning as L

from bbuqc_lightning.constants import MISSIONS
from bbuqc_lightning.generation.engine import GenerationEngine, SamplingParams
from bbuqc_lightning.models.factory import ModelBundle
from bbuqc_lightning.models.lora import attach_adapter
from bbuqc_lightning.stage_b.evaluation import generate_greedy
from bbuqc_lightning.stage_b.report import TABLE_COLUMNS, EvalReport
from bbuqc_lightning.stage_b.sample import StageBSample
from bbuqc_lightning.tracking.wandb import log_images, log_table


class EvalModule(L.LightningModule):
    """Greedy Stage-B verdicts on the test split -> rates, table, confusion PNGs and JSONL artifacts."""

    def __init__(
        self,
        bundle: ModelBundle,
        output_dir: str,
        adapter_path: str | None = None,
        merge_adapter: bool = True,
        max_new_tokens: int = 128,
        missions: Mapping[str, str] | None = None,
        table_rows: int | None = None,
        fsync: bool = True,
        generation: Callable[..., GenerationEngine] | None = None,
    ) -> None:
        super().__init__()
        model = bundle.model
        if adapter_path:
            model = attach_adapter(model, adapter_path, merge=merge_adapter)
        model.eval()
        self.model = model
        self.engine = (generation or GenerationEngine)(model, bundle.processor)
        self.sampling = SamplingParams(max_new_tokens=max_new_tokens)
        self.output_dir = Path(output_dir)
        self.missions = dict(missions or MISSIONS)
        self.table_rows = table_rows
        self.fsync = fsync
        self.report: EvalReport | None = None
        self._seconds = 0.0

    def on_test_start(self) -> None:
        if self.trainer.world_size > 1:
            raise ValueError(
                "evaluation runs on one device (trainer.devices=1): a distributed sampler repeats groups "
                "to even out the ranks, which would skew the rates"
            )
        self.report = EvalReport(
            self.output_dir, self.missions, prefix="test/", fsync=self.fsync, table_rows=self.table_rows
        )
        self._seconds = 0.0

    def test_step(self, batch: list[StageBSample], batch_idx: int) -> None:
        assert self.report is not None, "on_test_start creates the report"
        start = time.perf_counter()
        texts, truncated = generate_greedy(self.engine, batch, self.sampling)
        self._seconds += time.perf_counter() - start
        self.report.add(batch, texts, truncated)

    def on_test_epoch_end(self) -> None:
        assert self.report is not None
        result = self.report.finish()
        groups = result.counts["predictions"]
        summary = {
            "test/groups": float(groups),
            "test/manual_review": float(result.counts["manual_review"]),
            "test/groups_per_s": groups / self._seconds if self._seconds else 0.0,
        }
        self.log_dict({**result.metrics, **summary})
        log_table(self.trainer, "test/predictions", TABLE_COLUMNS, self.report.rows)
        log_images(self.trainer, {f"test/confusion/{name}": path for name, path in result.images.items()})

    def teardown(self, stage: str) -> None:
        if self.report is not None:  # also after a failure mid-run: lines written so far stay readable
            self.report.close()
