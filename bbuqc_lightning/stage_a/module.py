"""Stage-A LightningModule: ``predict_step`` summarises a batch of images, one Chinese line each.

Generation goes through the shared :class:`~bbuqc_lightning.generation.engine.GenerationEngine`
(greedy by default, left padding, so batched output equals batch-1 output). The JSONL writer callback
(``callbacks/stage_a_writer.py``) turns the per-image predictions into one SPEC §4 line per group.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from bbuqc_lightning.data.images import load_image
from bbuqc_lightning.generation.engine import Ahead, GenerationEngine, SamplingParams, line_break_token_ids
from bbuqc_lightning.models.factory import ModelBundle
from bbuqc_lightning.summaries.records import clean_summary
from bbuqc_lightning.tracking.wandb import find_wandb_logger, log_table

log = logging.getLogger(__name__)

SAMPLE_PIXELS = 512 * 384  # the W&B table's photos


class StageAModule(L.LightningModule):
    """Image -> one-line summary. Returns ``{"ticket_key", "image_index", "summary"}`` per batch.

    ``run_summary`` (in metrics.json, the loggers and ``trainer.callback_metrics``), summed over ranks:
    ``stage_a/images`` and ``stage_a/groups`` summarised in this run (a resumed run counts only what it
    did), ``stage_a/skipped_groups`` (``data.strict=false``), ``stage_a/images_per_s``.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        num_table_samples: int = 8,
        generation: Callable[..., GenerationEngine] | None = None,
    ) -> None:
        super().__init__()
        if bundle.kind != "vl":
            raise ValueError(f"Stage-A needs a vision-language model (model.kind=vl), got {bundle.kind!r}")
        self.model = bundle.model
        self.engine = (generation or GenerationEngine)(bundle.model, bundle.processor)
        # A summary is one line: line-break tokens are never generated (clean_summary still guards).
        self.sampling = SamplingParams(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            suppress_token_ids=line_break_token_ids(bundle.tokenizer),
        )
        self.num_table_samples = num_table_samples
        self.run_summary: dict[str, float] = {}
        self._images = 0
        self._seconds = 0.0
        self._finished_work: list[Any] = []  # the cross-rank reductions' works, kept (see _all_reduce)
        # where the predict loop's time outside generation goes (logged at the end): the wait for the first
        # batch, the gaps between steps (the loader, the writer callback, Lightning) and the time after the last
        self.loop_seconds = {"first_batch": 0.0, "between_batches": 0.0, "after_last": 0.0}
        self._loop_start: float | None = None
        self._step_end: float | None = None
        self._samples: list[tuple[Any, str, str]] = []

    def on_predict_epoch_start(self) -> None:
        self._loop_start = time.perf_counter()

    def predict_step(self, batch: dict[str, list], batch_idx: int) -> dict[str, list]:
        start = time.perf_counter()
        if self._step_end is not None:
            self.loop_seconds["between_batches"] += start - self._step_end
        elif self._loop_start is not None:
            self.loop_seconds["first_batch"] = start - self._loop_start
        # the next batch's prompts (data.lookahead): started early, finished in the next step
        ahead = batch.get("ahead")
        outputs = self.engine.generate(
            batch["conversation"],
            self.sampling,
            images=[[im] for im in batch["image"]] if "image" in batch else None,
            names=_names(batch["meta"]),
            encoded=batch.get("prompt"),  # encoded in the DataLoader's workers
            keys=_keys(batch["meta"]),
            ahead=Ahead(ahead["prompt"], _keys(ahead["meta"]), _names(ahead["meta"])) if ahead else None,
        )
        self._seconds += time.perf_counter() - start
        self._images += len(outputs)
        summaries = []
        for meta, out in zip(batch["meta"], outputs, strict=True):
            summary = clean_summary(out[0].text)
            if not summary:
                raise ValueError(
                    f"empty Stage-A summary for group {meta['ticket_key']} image "
                    f"{meta['record'].image_paths[meta['image_index']].name} (raw output {out[0].text!r})"
                )
            summaries.append(summary)
        self._keep_samples(batch, summaries)
        self._step_end = time.perf_counter()
        return {
            "ticket_key": [m["ticket_key"] for m in batch["meta"]],
            "image_index": [m["image_index"] for m in batch["meta"]],
            "summary": summaries,
        }

    def _keep_samples(self, batch: dict[str, list], summaries: list[str]) -> None:
        for i, (meta, summary) in enumerate(zip(batch["meta"], summaries, strict=True)):
            if len(self._samples) >= self.num_table_samples:
                return
            if "image" in batch:
                image = batch["image"][i]
            else:  # prompts encoded in the loader's workers ship no photo: load the table's few again, small
                path = meta["record"].image_paths[meta["image_index"]]
                image = load_image(path, min_pixels=4096, max_pixels=SAMPLE_PIXELS)
            self._samples.append((image, meta["ticket_key"], summary))

    def teardown(self, stage: str) -> None:
        """The run summary, over all ranks: every rank reaches ``teardown``, even one that had no batch
        (a resumed run may leave a rank nothing to do), which ``on_predict_epoch_end`` does not guarantee.
        """
        if stage != "predict" or self._trainer is None:
            return
        if self._step_end is not None:
            self.loop_seconds["after_last"] = time.perf_counter() - self._step_end
        self.run_summary = self._global_summary()
        stats = getattr(self.engine, "stats", None)
        if isinstance(stats, dict) and "decode_seconds" in stats:
            log.info(
                "Stage-A engine (this rank): %.1f s generating; prefill %.1f s (%d prompts, %d tokens), decode "
                "%.1f s (%d steps, %.0f %% of rows running), %d captures (%.1f s), prompts encoded in the "
                "generation loop %.1f s",
                self._seconds,
                stats["prefill_seconds"],
                stats["prompts"],
                stats["prompt_tokens"],
                stats["decode_seconds"],
                stats["decode_steps"],
                100 * stats["occupancy"],
                stats["captures"],
                stats["capture_seconds"],
                stats["encode_seconds"],
            )
            if stats.get("mixed_steps"):
                log.info(
                    "Stage-A chunked prefill (this rank): %d steps carried prompt tokens (%.1f s of the prefill and "
                    "decode above)",
                    stats["mixed_steps"],
                    stats["mixed_seconds"],
                )
        log.info(
            "Stage-A predict loop (this rank), outside generation: %.1f s waiting for the first batch, %.1f s "
            "between batches (loader, writer), %.1f s after the last",
            *self.loop_seconds.values(),
        )
        # Spawned/forked DDP ranks run in child processes: train() in the parent reads callback_metrics,
        # which Lightning carries back from rank 0 (the module's attributes stay behind).
        self.trainer.callback_metrics.update({k: torch.tensor(v) for k, v in self.run_summary.items()})
        for logger in self.trainer.loggers:
            logger.log_metrics(self.run_summary, step=0)
        self._log_samples()

    def _global_summary(self) -> dict[str, float]:
        datamodule = self.trainer.datamodule
        skipped = len(getattr(datamodule, "skipped", []))
        shared = getattr(datamodule, "scan_skipped", 0)  # found by the scan on every rank: count once
        groups = len(getattr(datamodule, "records", []))
        strategy = self.trainer.strategy
        device = strategy.root_device
        sums = torch.tensor([self._images, groups, skipped - shared], dtype=torch.float64, device=device)
        images, groups, skipped = self._all_reduce(sums, "sum").tolist()
        # Ranks generate in parallel: throughput is all images over the slowest rank's generation time.
        seconds = float(
            self._all_reduce(torch.tensor(self._seconds, dtype=torch.float64, device=device), "max")
        )
        return {
            "stage_a/images": images,
            "stage_a/images_per_s": images / seconds if seconds else 0.0,
            "stage_a/groups": groups,
            "stage_a/skipped_groups": skipped + shared,
        }

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """``tensor`` reduced over the ranks in place (``op``: sum | max), its finished work kept by the module.

        Why not ``strategy.reduce``: these are a rank's last collectives before it ends. The gloo worker thread
        that ran one drops its reference to the work a moment after the caller's wait returns; when that is the
        last reference, the work's tensors are released there, which needs the GIL. A rank that reached
        interpreter shutdown by then makes the worker thread abort the process ("terminate called without an
        active exception"; Stage-A with ``trainer=ddp_cpu``, spawn, 1 run in 5 to 15). Holding the work here
        leaves its release to the module's, on the main thread."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.trainer.strategy.reduce(tensor, reduce_op=op)
        reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
        work = torch.distributed.all_reduce(tensor, op=reduce_op, async_op=True)
        assert work is not None
        work.wait()
        self._finished_work.append(work)
        return tensor

    def _log_samples(self) -> None:
        if not self._samples or find_wandb_logger(self.trainer) is None:
            return  # wandb is imported only for a W&B run: logger=csv / none runs without the package
        import wandb

        rows = [(wandb.Image(img), key, text) for img, key, text in self._samples]
        log_table(self.trainer, "stage_a/samples", ["image", "ticket_key", "summary"], rows)


def _names(metas: list[dict[str, Any]]) -> list[str]:
    """What errors call each photo: its group and file."""
    return [f"{m['ticket_key']} image {m['record'].image_paths[m['image_index']].name}" for m in metas]


def _keys(metas: list[dict[str, Any]]) -> list[str]:
    """Each photo's identity across ``generate`` calls (a prompt handed ahead is asked for again by it): its
    path (a ticket key can name two groups, the same ticket under two missions)."""
    return [str(m["record"].image_paths[m["image_index"]]) for m in metas]
