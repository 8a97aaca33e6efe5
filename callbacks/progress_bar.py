"""A progress bar whose total and ETA follow ``trainer.max_steps`` (and the ``limit_*_batches``).

Lightning's bar counts a whole epoch unless ``max_epochs == -1``: ``+experiment=grpo`` (max_steps 4 of a
16-batch epoch) showed ``4/16`` and an ETA four times too long. Here the training total is the batches
this epoch can still run: ``min(batches in the epoch, optimizer steps left x batches per step)``
(gradient accumulation makes one step several batches). The ``limit_*_batches`` are already in
Lightning's batch counts. ``conf/callbacks/default.yaml`` uses the Rich bar (Lightning's own choice when
``rich`` is installed); the tqdm one is here for those who prefer it.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


def steps_bounded_total(trainer: L.Trainer) -> int | float:
    """Training batches the epoch starting now will run, given ``max_steps`` (read at epoch start)."""
    batches = trainer.num_training_batches
    max_steps = trainer.max_steps
    if max_steps is None or max_steps < 0:
        return batches
    steps_left = max(0, max_steps - trainer.global_step)
    return min(batches, steps_left * max(1, trainer.accumulate_grad_batches))


class StepBoundedRichProgressBar(RichProgressBar):
    """Rich progress bar, training total bounded by ``max_steps``."""

    @property
    def total_train_batches(self) -> int | float:
        return steps_bounded_total(self.trainer)


class StepBoundedTQDMProgressBar(TQDMProgressBar):
    """tqdm progress bar, training total bounded by ``max_steps``."""

    @property
    def total_train_batches(self) -> int | float:
        return steps_bounded_total(self.trainer)
