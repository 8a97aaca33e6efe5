"""Stream Stage-A predictions into the SPEC §4 JSONL: one line per group, resumable, crash-safe, DDP-aware.

Contract with the Stage-A DataModule and LightningModule (``bbuqc_lightning/stage_a``)::

    batch["meta"]   = [{"ticket_key": str, "image_index": int (0-based), "num_images": int,
                        "record": GroupRecord}, ...]            # one dict per image of the batch
    predict_step(.) -> {"ticket_key": [str, ...], "image_index": [int, ...], "summary": [str, ...]}
                                                               # same order and length as batch["meta"]

The writer buffers summaries per ``ticket_key`` and, as soon as all ``num_images`` of a group are in,
builds the line with :func:`~bbuqc_lightning.summaries.records.build_stage_a_record` (alignment check)
and appends it with :class:`~bbuqc_lightning.data.jsonl.JsonlAppender` (write + flush + fsync per line).

Resume: the constructor reads the ``ticket_key`` s already in the output (and in shards left by a
killed DDP run) into :attr:`StageAJsonlWriter.completed_ticket_keys`, before the DataModule's
``setup`` runs (Lightning calls ``DataModule.setup`` before ``Callback.setup``), so the caller can hand
it over: ``datamodule.skip_ticket_keys = writer.completed_ticket_keys``. The writer's own ``setup``
also merges it into ``trainer.datamodule.skip_ticket_keys`` when that attribute exists (useful if the
DataModule filters in ``predict_dataloader``). Whatever the wiring, a group already written is never
written again (counted in ``groups_already_written``). A torn last line is cut before appending.

Settings: with ``settings`` (model, prompts, generation; the ``stage_a`` experiment passes them) a resume into
an output written with other settings is refused in ``setup``, before any generation, unless
``append_anyway`` (see :mod:`bbuqc_lightning.stage_a.settings`); they are recorded in
``<output>.settings.json``.

DDP: each rank must receive *whole* groups (``use_distributed_sampler=False`` and a DataModule that
splits records by rank). Rank ``k`` appends to ``<output>.rank<k>.jsonl``; at the end, after a barrier,
rank 0 appends every shard line whose ``ticket_key`` is not yet in the output, then deletes the shards
(also any shards of an earlier killed run, whatever its world size). A kill during the merge is
harmless: the rerun re-reads main + shards and merges with the same dedupe. The merge runs in
``teardown``, not ``on_predict_end``: Lightning skips the predict loop, and all its hooks, on a rank whose
dataloader is empty (a resumed run with nothing left for that rank, or nothing left at all), and the
leftover shards must still be merged. Pass ``trainer.predict(..., return_predictions=False)`` so
predictions are not also kept in memory.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from bbuqc_lightning.data.jsonl import JsonlAppender, iter_jsonl, read_jsonl_keys
from bbuqc_lightning.data.tree import GroupRecord
from bbuqc_lightning.stage_a.settings import check_output_settings, record_output_settings
from bbuqc_lightning.summaries.records import build_stage_a_record, check_stage_a_line

log = logging.getLogger(__name__)

_SHARD_SUFFIX = re.compile(r"\.rank([0-9]+)\.jsonl$")


def shard_path(output: str | Path, rank: int) -> Path:
    """``stage_a.jsonl`` -> ``stage_a.jsonl.rank1.jsonl`` (next to the output)."""
    output = Path(output)
    return output.with_name(f"{output.name}.rank{rank}.jsonl")


def list_shards(output: str | Path) -> list[Path]:
    """Shards of ``output`` present on disk, by rank."""
    output = Path(output)
    if not output.parent.is_dir():
        return []
    found = []
    for path in output.parent.glob(f"{output.name}.rank*.jsonl"):
        match = _SHARD_SUFFIX.search(path.name)
        if match and path.name == shard_path(output, int(match.group(1))).name:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def completed_ticket_keys(output: str | Path) -> set[str]:
    """``ticket_key`` s already written to ``output`` or to any of its shards (complete lines only)."""
    keys = read_jsonl_keys(output, "ticket_key")
    for shard in list_shards(output):
        keys |= read_jsonl_keys(shard, "ticket_key")
    return keys


def merge_shards(output: str | Path, fsync: bool = True) -> int:
    """Append shard lines whose ``ticket_key`` is not yet in ``output``, then delete the shards.

    Shards are deleted only after every line is durable in ``output``. Returns the lines appended.
    """
    output = Path(output)
    shards = list_shards(output)
    if not shards:
        return 0
    appended = 0
    with JsonlAppender(output, fsync=fsync) as out:  # repairs a torn tail of the output first
        present = read_jsonl_keys(output, "ticket_key")
        for shard in shards:
            for row in iter_jsonl(shard):
                check_stage_a_line(row)
                if row["ticket_key"] in present:
                    continue
                out.append(row)
                present.add(row["ticket_key"])
                appended += 1
    for shard in shards:
        shard.unlink()
    log.info("merged %d Stage-A lines from %d shard(s) into %s", appended, len(shards), output)
    return appended


class StageAJsonlWriter(BasePredictionWriter):
    """Writes one SPEC §4 line per group to ``output_jsonl`` as soon as the group is complete.

    Counters (per rank): ``groups_written``, ``images_written``, ``groups_already_written`` (predictions
    for groups found in the output, dropped), ``groups_resumed`` (groups in the output at start),
    ``groups_merged`` (rank 0, lines moved from DDP shards).
    """

    def __init__(
        self,
        output_jsonl: str,
        fsync: bool = True,
        settings: dict[str, Any] | None = None,
        append_anyway: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output_jsonl)
        self.fsync = fsync
        # What shapes a summary (model, prompts, generation): a resume with other settings is refused.
        self.settings = settings
        self.append_anyway = append_anyway
        self.completed_ticket_keys: set[str] = completed_ticket_keys(self.output)
        self.groups_resumed = len(self.completed_ticket_keys)
        self.groups_written = 0
        self.images_written = 0
        self.groups_already_written = 0
        self.groups_merged = 0
        self._target = self.output
        self._appender: JsonlAppender | None = None
        self._buffers: dict[str, dict[int, str]] = {}
        self._records: dict[str, GroupRecord] = {}
        if self.groups_resumed:
            log.info("Stage-A resume: %d groups already in %s", self.groups_resumed, self.output)

    # ---------------------------------------------------------------- Lightning hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.completed_ticket_keys |= completed_ticket_keys(self.output)
        self._target = shard_path(self.output, trainer.global_rank) if trainer.world_size > 1 else self.output
        if self.settings is not None and check_output_settings(
            self.output, self.settings, self.append_anyway
        ):
            trainer.strategy.barrier("stage_a_writer_settings_checked")  # every rank read the old record
            if trainer.is_global_zero:
                record_output_settings(self.output, self.settings)
        datamodule = getattr(trainer, "datamodule", None)
        skip = getattr(datamodule, "skip_ticket_keys", None)
        if isinstance(skip, set):
            skip |= self.completed_ticket_keys

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._buffers.clear()
        self._records.clear()
        self._appender = JsonlAppender(self._target, fsync=self.fsync)
        self._appender.open()  # creates the file (an empty output is still an output) and repairs its tail

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        metas = batch["meta"]
        summaries = _aligned_summaries(prediction, metas, batch_idx)
        for meta, summary in zip(metas, summaries, strict=True):
            self.add(meta["record"], int(meta["image_index"]), int(meta["num_images"]), summary)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()  # this rank's lines are all durable; the merge waits for every rank (teardown)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Merge the shards (rank 0) once every rank is done; every rank gets here, batches or not."""
        if stage != "predict":
            return
        self._close()
        trainer.strategy.barrier("stage_a_writer_shards_done")
        if trainer.is_global_zero:
            self.groups_merged = merge_shards(self.output, fsync=self.fsync)
            with JsonlAppender(self.output, fsync=self.fsync):  # an empty output is still an output
                pass
        trainer.strategy.barrier("stage_a_writer_merged")
        log.info(
            "Stage-A writer (rank %d): %d groups / %d images written, %d already written, %d merged -> %s",
            trainer.global_rank, self.groups_written, self.images_written,
            self.groups_already_written, self.groups_merged, self.output,
        )  # fmt: skip
        self._report_incomplete(_loop_was_cut(trainer))

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._close()  # every written line is already durable; just release the file

    # ---------------------------------------------------------------- buffering

    def add(self, record: GroupRecord, image_index: int, num_images: int, summary: str) -> None:
        """Buffer one image's summary; write the group's line once all its images are in."""
        key = record.ticket_key
        if num_images != len(record.image_paths) or not 0 <= image_index < num_images:
            raise ValueError(
                f"group {key}: batch meta says image {image_index} of {num_images}, "
                f"record has {len(record.image_paths)} images"
            )
        buffer = self._buffers.setdefault(key, {})
        self._records.setdefault(key, record)
        if image_index in buffer:
            log.debug("group %s: image %d predicted twice, keeping the first", key, image_index)
        buffer.setdefault(image_index, summary)
        if len(buffer) == num_images:
            del self._buffers[key]
            self._write_group(self._records.pop(key), [buffer[i] for i in range(num_images)])

    def _write_group(self, record: GroupRecord, summaries: list[str]) -> None:
        if record.ticket_key in self.completed_ticket_keys:
            self.groups_already_written += 1
            log.info("group %s is already in %s; not writing it again", record.ticket_key, self.output)
            return
        line = build_stage_a_record(record, summaries)  # alignment check before anything is written
        if self._appender is None:  # driven without a Trainer (tests, tools): open lazily
            self._appender = JsonlAppender(self._target, fsync=self.fsync)
            self._appender.open()
        self._appender.append(line)
        self.completed_ticket_keys.add(record.ticket_key)
        self.groups_written += 1
        self.images_written += len(summaries)

    def _close(self) -> None:
        if self._appender is not None:
            self._appender.close()
            self._appender = None

    def _report_incomplete(self, loop_was_cut: bool) -> None:
        """Groups still buffered at the end were not written: an error, unless the loop was cut on purpose.

        With ``limit_predict_batches`` / ``fast_dev_run`` (``debug=limit``, ``debug=fdr``) a group can be
        cut in the middle: it is left out with a warning and a rerun without the limit summarises it.
        Otherwise the data contract was broken (e.g. a DDP sampler split a group across ranks).
        """
        if not self._buffers:
            return
        pending = {
            key: f"{len(buf)}/{len(self._records[key].image_paths)}" for key, buf in self._buffers.items()
        }
        shown = dict(list(pending.items())[:10])
        if loop_was_cut:
            log.warning(
                "Stage-A: the predict loop was limited (limit_predict_batches / fast_dev_run); %d group(s) "
                "cut in the middle are not written (images done/total): %s. A rerun without the limit "
                "completes them.",
                len(pending), shown,
            )  # fmt: skip
            return
        raise RuntimeError(
            f"Stage-A: {len(pending)} group(s) did not receive all their images and were not written: "
            f"{shown}. Under DDP each rank must get whole groups (trainer.use_distributed_sampler=false)."
        )


def _loop_was_cut(trainer: L.Trainer) -> bool:
    """True when the predict loop ran fewer batches than its dataloaders hold, on purpose."""
    if trainer.fast_dev_run:
        return True
    loaders = trainer.predict_dataloaders
    loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
    try:
        full = [len(loader) for loader in loaders]
    except TypeError:  # iterable without a length: cannot tell, so not cut
        return False
    return any(ran < total for ran, total in zip(trainer.num_predict_batches, full, strict=False))


def _aligned_summaries(prediction: Any, metas: Sequence[dict[str, Any]], batch_idx: int) -> list[str]:
    """The batch's summaries, after checking that the prediction lines up with ``batch["meta"]``."""
    if not isinstance(prediction, dict) or "summary" not in prediction:
        raise ValueError(f"predict batch {batch_idx}: predict_step must return a dict with 'summary'")
    summaries = list(prediction["summary"])
    if len(summaries) != len(metas):
        raise ValueError(f"predict batch {batch_idx}: {len(summaries)} summaries for {len(metas)} images")
    for field in ("ticket_key", "image_index"):
        if field in prediction and list(prediction[field]) != [m[field] for m in metas]:
            raise ValueError(f"predict batch {batch_idx}: prediction {field!r} does not match batch['meta']")
    return summaries
