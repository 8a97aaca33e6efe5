"""Stage-B DataModule: Stage-A JSONL (train / val) -> text-only Stage-B samples (SPEC §5).

Batches are lists of :class:`~bbuqc_lightning.stage_b.sample.StageBSample`: the GRPO module generates from
``messages`` and hands :meth:`~bbuqc_lightning.stage_b.sample.StageBSample.reward_columns` to the reward
functions, TRL-style. Under DDP
the training order is an :class:`~bbuqc_lightning.data.resumable.EpochSampler` (seeded by ``(seed, epoch)``)
whose position Lightning checkpoints, so ``ckpt_path=...`` resumes on the exact next batch. Under DDP the
sampler splits *prompts* across ranks (or Lightning's distributed sampler does, when
``trainer.use_distributed_sampler`` is on: then a mid-epoch resume restarts the epoch's order), and each
rank samples all G completions of its prompts, so a group never straddles ranks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler

from bbuqc_lightning.data.resumable import EpochSampler, ResumableLoader, trained_batches
from bbuqc_lightning.stage_b.builder import build_stage_b_samples, load_guidance, read_stage_a_jsonl
from bbuqc_lightning.stage_b.sample import StageBSample

log = logging.getLogger(__name__)


def collate_samples(samples: list[StageBSample]) -> list[StageBSample]:
    """Keep samples as a list (messages are nested text; nothing to tensorise before generation)."""
    return samples


class StageBDataModule(L.LightningDataModule):
    """Builds Stage-B prompts from Stage-A JSONL files, with optional per-mission guidance."""

    def __init__(
        self,
        train_jsonl: str | None,
        val_jsonl: str | None,
        templates: dict,
        processor: Any = None,
        test_jsonl: str | None = None,
        guidance_path: str | None = None,
        max_prompt_tokens: int | None = 2048,
        strict: bool = True,
        batch_size: int = 4,
        val_batch_size: int = 8,
        shuffle: bool = True,
        limit_samples: int | None = None,
        synthetic: dict | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.paths = {"train": train_jsonl, "val": val_jsonl, "test": test_jsonl}
        self.templates = templates
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.guidance_path = guidance_path
        self.max_prompt_tokens = max_prompt_tokens
        self.strict = strict
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.shuffle = shuffle
        self.limit_samples = limit_samples
        self.synthetic = synthetic
        self.seed = seed
        self.samples: dict[str, list[StageBSample]] = {}
        self.skipped: dict[str, int] = {}

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        """Text samples stay on the host; the generation engine moves the encoded tensors."""
        return batch

    def prepare_data(self) -> None:
        missing = [p for p in self.paths.values() if p and not Path(p).exists()]
        if missing and self.synthetic:
            from bbuqc_lightning.data.synthetic.tree import ensure_synthetic

            ensure_synthetic(**self.synthetic)
            missing = [p for p in missing if not Path(p).exists()]
        if missing:
            raise FileNotFoundError(f"Stage-B input not found: {', '.join(map(str, missing))}")

    def setup(self, stage: str | None = None) -> None:
        guidance = load_guidance(self.guidance_path) if self.guidance_path else None
        for split, path in self.paths.items():
            if not path or split in self.samples:
                continue
            records, bad_lines = read_stage_a_jsonl(path, strict=self.strict)
            samples, too_long = build_stage_b_samples(
                records, self.templates, guidance, self.tokenizer, self.max_prompt_tokens, self.strict
            )
            unlabelled = 0
            if split == "train":
                samples, unlabelled = self._labelled(samples, path)
            if not samples:
                raise ValueError(
                    f"{path}: no Stage-B {split} tickets to use ({bad_lines + too_long + unlabelled} skipped)"
                )
            self.samples[split] = samples[: self.limit_samples] if self.limit_samples else samples
            self.skipped[split] = bad_lines + too_long + unlabelled
            log.info(
                "Stage-B %s: %d samples from %s (%d skipped)", split, len(samples), path, self.skipped[split]
            )

    def _labelled(self, samples: list[StageBSample], path: str | Path) -> tuple[list[StageBSample], int]:
        """Training rewards and reflects on the human label: a ticket without one (``label: null``, inference
        only) is an error naming it, or with ``strict=false`` a counted, logged skip."""
        unlabelled = [s for s in samples if s.label is None]
        if not unlabelled:
            return samples, 0
        message = (
            f"{path}: {len(unlabelled)} of {len(samples)} tickets have no label (first: "
            f"{unlabelled[0].ticket_key}); training needs 'pass' or 'fail' on every ticket"
        )
        if self.strict:
            raise ValueError(message + " (data.strict=false skips them)")
        log.warning("%s: skipped", message)
        return [s for s in samples if s.label is not None], len(unlabelled)

    def _world(self) -> tuple[int, int, bool]:
        """World size, rank, and whether Lightning puts its own distributed sampler in."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return 1, 0, False
        return trainer.world_size, trainer.global_rank, trainer._accelerator_connector.use_distributed_sampler

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if split not in self.samples:
            raise ValueError(f"no Stage-B {split} data: set data.{split}_jsonl")
        rows = self.samples[split]
        world, rank, lightning_splits = self._world()
        sampler = None
        if world > 1 and not lightning_splits:  # the sampler Lightning would have put in
            sampler = DistributedSampler(rows, world, rank, shuffle=False)
        return DataLoader(
            rows,
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            collate_fn=collate_samples,
        )

    def train_dataloader(self) -> DataLoader:
        world, rank, lightning_splits = self._world()
        if lightning_splits:
            return self._loader("train", self.batch_size, self.shuffle)
        if "train" not in self.samples:
            raise ValueError("no Stage-B train data: set data.train_jsonl")
        samples = self.samples["train"]
        return ResumableLoader(
            samples,
            batch_size=self.batch_size,
            sampler=EpochSampler(len(samples), self.seed, self.shuffle, num_replicas=world, rank=rank),
            collate_fn=collate_samples,
            progress=lambda: trained_batches(self.trainer),
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.val_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.val_batch_size, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", self.val_batch_size, False)
