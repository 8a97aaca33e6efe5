"""Fusion DataModule: named JSONL data sets mixed by ratio per epoch (SPEC §9) -> SFT batches.

- ``prepare_data``: checks every file the fusion file names; when some are missing, or the synthetic fusion
  files it reads were written by another version of their writer, and the embedded synthetic data is configured,
  generates the synthetic tree and its fusion JSONL files (again) first.
- ``setup``: reads every entry's rows (:mod:`bbuqc_lightning.fusion_sft.rows`), located errors on bad rows.
- training: one :class:`~bbuqc_lightning.fusion_sft.sampler.FusionSampler` over all entries (quotas per
  epoch, reseeded by ``(seed, epoch)``, this rank's slice), in a :class:`ResumableLoader` whose state
  (epoch, rows consumed) is saved in Lightning checkpoints, so ``ckpt_path=...`` resumes mid-epoch on
  the exact next batch. The sampler splits ranks itself: run with ``trainer.use_distributed_sampler=false``
  (the ``fusion_sft`` experiment sets it).
- validation: one loader per target that has a ``val_jsonl`` (sources are never validated), each row
  once, so the module logs ``val/loss/<target>``.
- ``group_by_length`` (off by default): each row's token count is computed at ``setup``
  (:meth:`~bbuqc_lightning.fusion_sft.collator.SFTCollator.estimate_length`, ~0.5 ms a row on one core), the sampler
  sorts every ``length_group_batches`` batches of the shuffled epoch longest first
  (:func:`~bbuqc_lightning.fusion_sft.sampler.group_by_length`), and the validation rows are served longest first.
  Tickets of 1 to 20+ photos give Stage-B rows of a few hundred to a few thousand tokens, and a batch pads every row
  to its longest: setup logs the share of padding in the first epoch's batches with and without grouping.

Example::

    dm = FusionDataModule("default", processor=bundle.processor, templates=cfg.data.templates,
                          variables={"synthetic_dir": "data/synthetic"})
    dm.prepare_data(); dm.setup("fit"); batch = next(iter(dm.train_dataloader()))
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler

from bbuqc_lightning.data.resumable import ResumableLoader, trained_batches
from bbuqc_lightning.fusion_sft.collator import SFTCollator
from bbuqc_lightning.fusion_sft.fusion_config import FusionConfig, FusionEntry, load_fusion_config
from bbuqc_lightning.fusion_sft.rows import read_entry_samples
from bbuqc_lightning.fusion_sft.sampler import FusionSampler, Pool, group_by_length
from bbuqc_lightning.summaries.prompts import stage_a_prompt

log = logging.getLogger(__name__)


class FusionDataModule(L.LightningDataModule):
    """Reads a fusion file and serves ratio-mixed training batches and per-target validation batches."""

    def __init__(
        self,
        fusion: str,
        processor: Any,
        templates: Mapping[str, Mapping[str, Any]],
        variables: Mapping[str, Any] | None = None,
        seed: int = 0,
        batch_size: int = 4,
        val_batch_size: int = 8,
        num_workers: int = 0,
        max_length: int | None = 2048,
        on_overflow: Literal["error", "truncate"] = "error",
        strict: bool = True,
        min_pixels: int = 4096,
        max_pixels: int = 1024 * 768,
        synthetic: Mapping[str, Any] | None = None,
        synthetic_sources: Mapping[str, Any] | None = None,
        group_by_length: bool = False,
        length_group_batches: int = 50,
    ) -> None:
        super().__init__()
        if length_group_batches < 1:
            raise ValueError(f"data.length_group_batches must be >= 1, got {length_group_batches}")
        self.group_by_length = group_by_length
        # rows per sorted group; not times the world size, so the epoch's order stays the same under another one
        self.length_group_rows = length_group_batches * batch_size
        self.lengths: list[int] | None = None
        self.fusion = fusion
        self.templates = {name: dict(block) for name, block in templates.items()}
        # Variables come from the run config, so relative paths there mean the working directory (a
        # relative path written in a fusion file itself is relative to that file).
        self.variables = {k: _absolute(v) for k, v in (variables or {}).items()}
        self.seed = seed
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.strict = strict
        self.synthetic = synthetic
        self.synthetic_sources = synthetic_sources
        self.collator = SFTCollator(processor, max_length, on_overflow, min_pixels, max_pixels)
        self.config: FusionConfig | None = None
        self.train_rows: list[dict[str, Any]] = []
        self.pools: list[Pool] = []
        self.val_rows: dict[str, list[dict[str, Any]]] = {}
        self.skipped = 0

    # ------------------------------------------------------------------ reading
    def load_config(self) -> FusionConfig:
        return load_fusion_config(self.fusion, self.variables, bbu_templates=self.templates)

    def prepare_data(self) -> None:
        config = self.load_config()
        missing = _missing_files(config)
        if self.synthetic and self.synthetic_sources and (missing or self._stale_synthetic_sources(config)):
            from bbuqc_lightning.data.synthetic.tree import ensure_synthetic
            from bbuqc_lightning.fusion_sft.synthetic_sources import ensure_fusion_sources

            root = ensure_synthetic(**self.synthetic)
            ensure_fusion_sources(synthetic_dir=root, **self.synthetic_sources)
            missing = _missing_files(self.load_config())
        if missing:
            raise FileNotFoundError("fusion data not found: " + "; ".join(missing))

    def _stale_synthetic_sources(self, config: FusionConfig) -> bool:
        """The fusion file reads the synthetic fusion files, and they were written by another version."""
        from bbuqc_lightning.fusion_sft.synthetic_sources import is_stale

        out = Path(self.synthetic_sources["out_dir"]).resolve()
        used = any(e.train_jsonl.parent.resolve() == out for e in config.entries)
        return used and is_stale(out)

    def prompt(self, template: str, mission: str) -> str:
        """The ``template``'s prompt for ``mission`` (``dataset: bbu`` rows)."""
        return stage_a_prompt(self.templates[template], mission)

    def setup(self, stage: str | None = None) -> None:
        if self.config is not None:
            return
        self.config = config = self.load_config()
        self.train_rows, self.pools = [], []
        for entry in config.entries:
            rows = self._read(entry, "train") if entry.ratio > 0 else []
            self.pools.append(_pool(entry, rows))
            self.train_rows += rows
        self.val_rows = {e.name: self._read(e, "val") for e in config.targets if e.val_jsonl is not None}
        if self.group_by_length:
            self._measure_lengths()
        sizes = {p.name: p.size for p in self.pools}
        log.info("fusion %s: rows %s, quotas per epoch %s", config.path, sizes, self._sampler().quotas)
        if not self.val_rows:
            log.warning(
                "fusion %s: no target has a val_jsonl, so validation is skipped (no val/loss)", config.path
            )

    def _measure_lengths(self) -> None:
        """Every training row's tokens, for the sampler; the validation rows sorted longest first (their losses are
        token sums, whatever the order); the first epoch's padding share with and without grouping, logged."""
        start = time.perf_counter()
        self.lengths = [self.collator.estimate_length(row) for row in self.train_rows]
        for name, rows in self.val_rows.items():
            lengths = [self.collator.estimate_length(row) for row in rows]
            self.val_rows[name] = [rows[i] for i in sorted(range(len(rows)), key=lambda i: -lengths[i])]
        plain = FusionSampler(self.pools, seed=self.seed).epoch_order(0)
        grouped = group_by_length(plain, self.lengths, self.length_group_rows)
        log.info(
            "group_by_length: %d rows measured in %.1f s; padding in epoch 0's batches of %d: %.0f %% grouped, "
            "%.0f %% without",
            len(self.lengths),
            time.perf_counter() - start,
            self.batch_size,
            100 * padding_share(grouped, self.lengths, self.batch_size),
            100 * padding_share(plain, self.lengths, self.batch_size),
        )

    def _read(self, entry: FusionEntry, split: str) -> list[dict[str, Any]]:
        rows, skipped = read_entry_samples(entry, split, self.prompt, strict=self.strict)
        self.skipped += skipped
        return rows

    # --------------------------------------------------------------- loaders
    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _sampler(self) -> FusionSampler:
        world, rank = self._world()
        return FusionSampler(
            self.pools,
            seed=self.seed,
            num_replicas=world,
            rank=rank,
            lengths=self.lengths,
            group_rows=self.length_group_rows,
        )

    def _batches_done(self) -> int | None:
        return trained_batches(self.trainer)

    def train_dataloader(self) -> ResumableLoader:
        world, _ = self._world()
        trainer = self.trainer
        if world > 1 and trainer is not None and trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError(
                "the fusion sampler splits ranks itself: set trainer.use_distributed_sampler=false"
            )
        return ResumableLoader(
            self.train_rows,
            batch_size=self.batch_size,
            sampler=self._sampler(),
            collate_fn=self.collator,
            num_workers=self.num_workers,
            progress=self._batches_done,
        )

    def val_dataloader(self) -> list[DataLoader]:
        world, rank = self._world()
        loaders = []
        for rows in self.val_rows.values():
            sampler = DistributedSampler(rows, world, rank, shuffle=False) if world > 1 else None
            loaders.append(
                DataLoader(
                    rows,
                    batch_size=self.val_batch_size,
                    sampler=sampler,
                    collate_fn=self.collator,
                    num_workers=self.num_workers,
                )
            )
        return loaders

    @property
    def dataset_names(self) -> list[str]:
        """Every entry's name, targets first (the keys of ``train/loss/<name>``)."""
        return [p.name for p in self.pools]


def padding_share(order: list[int], lengths: list[int], batch_size: int) -> float:
    """The share of padding in the batches of ``batch_size`` that ``order`` makes (each row padded to its batch's
    longest), on one rank."""
    padded = real = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return 1 - real / padded if padded else 0.0


def _pool(entry: FusionEntry, rows: list[dict[str, Any]]) -> Pool:
    """The sampler's view of an entry: a row's draw weight is ``fail_oversample`` if it is labelled fail, times
    the weight of the first ``answer_oversample`` pattern its answer (the last turn) matches; uniform when every
    weight is 1. Each pattern's count is logged (the rows it weighs, not those an earlier pattern took)."""
    fail = entry.fail_oversample if any(r["label"] == "fail" for r in rows) else 1.0
    if entry.fail_oversample != 1.0 and fail == 1.0 and rows:
        log.warning(
            "%s (%s): fail_oversample=%g, but none of its %d rows is labelled fail: drawn uniformly",
            entry.name,
            entry.where,
            entry.fail_oversample,
            len(rows),
        )
    weights = [fail if r["label"] == "fail" else 1.0 for r in rows]
    if entry.answer_oversample is not None and rows:
        rules = [(re.compile(match), weight) for match, weight in entry.answer_oversample]
        taken = [
            next((i for i, (pattern, _) in enumerate(rules) if pattern.search(_answer(r))), None)
            for r in rows
        ]
        weights = [w if i is None else w * rules[i][1] for w, i in zip(weights, taken, strict=True)]
        for i, (pattern, weight) in enumerate(rules):
            n = taken.count(i)
            log.log(
                logging.INFO if 0 < n < len(rows) else logging.WARNING,
                "%s (%s): answer_oversample %r matches %d of %d rows (weight %g)%s",
                entry.name,
                entry.where,
                pattern.pattern,
                n,
                len(rows),
                weight,
                "" if 0 < n < len(rows) else (": drawn uniformly" if len(rules) == 1 else ""),
            )
    uniform = all(w == 1.0 for w in weights)
    return Pool(
        entry.name,
        entry.role,
        len(rows),
        entry.ratio,
        entry.sample_without_replacement,
        None if uniform else tuple(weights),
    )


def _answer(row: dict[str, Any]) -> str:
    """The text of a row's last turn (a string, or the text parts of a content list)."""
    content = row["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(str(c.get("text") or "") if isinstance(c, dict) else str(c) for c in parts)


def _absolute(value: Any) -> Any:
    return str(Path(value).expanduser().absolute()) if isinstance(value, str) and value else value


def _missing_files(config: FusionConfig) -> list[str]:
    missing = []
    for entry in config.entries:
        paths: list[Path | None] = [entry.train_jsonl if entry.ratio > 0 else None]
        paths += [entry.val_jsonl] if entry.role == "target" else []
        missing += [f"{p} ({entry.where}, {entry.name})" for p in paths if p is not None and not p.is_file()]
    return missing
