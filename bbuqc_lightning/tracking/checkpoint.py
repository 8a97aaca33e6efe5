"""Lightning checkpoints that hold only what training changes, and resume where the run stopped.

- Only the trainable (LoRA) weights are stored: the frozen base (gigabytes for a 4B model) is rebuilt from
  ``model.model_name_or_path`` on resume, so a checkpoint is the size of the adapters.
- Every training step reseeds Python, NumPy and torch from ``(seed, global_step, rank)`` before it runs, so
  a step's randomness (dropout, sampled rollouts) is the same whether the run got there uninterrupted or
  resumed from a checkpoint: no dataloader start, validation pass or restore order between two steps
  can shift it. The seed is the one ``lightning.seed_everything`` was given (``PL_GLOBAL_SEED``).
- A checkpoint written after training stopped mid-epoch (``max_steps`` reached, a signal) is marked as
  *mid-epoch*: Lightning counts the epoch as finished when ``fit`` returns, so a resume with a larger
  ``max_steps`` would otherwise start a new epoch, or, with ``max_epochs=1``, train nothing. The data
  position itself comes from :class:`~bbuqc_lightning.data.resumable.ResumableLoader`.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from bbuqc_lightning.tracking.rng import rng_state, set_rng_state


def seed_step(step: int, rank: int = 0) -> None:
    """Seed every generator for training step ``step`` of this ``rank``."""
    base = int(os.environ.get("PL_GLOBAL_SEED", 0))
    seed = int(np.random.SeedSequence([base, step, rank]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also every CUDA device


def mark_epoch_unfinished(checkpoint: dict[str, Any], batches_per_epoch: float) -> None:
    """Rewrite the fit loop's progress of a checkpoint saved after ``fit`` stopped short of the epoch end.

    Lightning's mid-epoch form (what a checkpoint written in ``on_train_batch_end`` holds) is: epochs
    started = ready, processed = completed = started - 1. A checkpoint written at the exact end of an epoch
    gets its batch counters of the finished epoch cleared instead, so the next epoch starts at batch 0.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not fit or "epoch_progress" not in fit:
        return
    batches = fit["epoch_loop.batch_progress"]
    done = batches["current"]["processed"]
    epochs = fit["epoch_progress"]
    if epochs["current"]["processed"] != epochs["current"]["started"]:
        return  # saved inside the epoch: already the mid-epoch form
    if 0 < done < batches_per_epoch and not batches["is_last_batch"]:
        for key in ("total", "current"):
            epochs[key]["processed"] = epochs[key]["completed"] = epochs[key]["started"] - 1
        checkpoint["epoch"] = epochs["current"]["completed"]
    elif epochs["current"]["completed"] == epochs["current"]["started"]:
        batches["current"] = dict.fromkeys(batches["current"], 0)
        batches["is_last_batch"] = False


class TrainableStateCheckpointing:
    """Mixin for a ``LightningModule``; set ``self.strict_loading = False`` in its ``__init__``."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        trainer = self.trainer  # type: ignore[attr-defined]
        seed_step(trainer.global_step, trainer.global_rank)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}  # type: ignore[attr-defined]
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["rng_state"] = rng_state()
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            mark_epoch_unfinished(checkpoint, trainer.num_training_batches)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_state" in checkpoint:
            set_rng_state(checkpoint["rng_state"])
