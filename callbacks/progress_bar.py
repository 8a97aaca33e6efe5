"""A progress bar whose total and ETA follow ``trainer.max_steps`` (and the ``limit_*_batches``).

Lightning's bar counts a whole epoch unless ``max_epochs == -1``: ``+experiment=grpo`` (max_steps 4 of a
16-batch epoch) showed ``4/16`` and an ETA four times too long. Here the training total is the batches
this epoch can still run: ``min(batches in the epoch, optimizer steps left x batches per step)``
(gradient accumulation makes one step several batches). The ``limit_*_batches`` are already in
Lightning's batch counts. ``conf/callbacks/default.yaml`` uses the Rich bar (Lightning's own choice when
``rich`` is installed); the tqdm one is here for those who prefer it.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


def steps_bounded_total(trainer: L.Trainer) -> int | float:
    """Training batches of the current epoch the bar counts to, given ``max_steps``: those done so far (a run
    resumed mid-epoch counts on from its batch index) plus those the steps left will run. Read at an epoch's or a
    batch's start, when the steps left do not yet count the batch about to run."""
    batches = trainer.num_training_batches
    max_steps = trainer.max_steps
    if max_steps is None or max_steps < 0:
        return batches
    done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
    steps_left = max(0, max_steps - trainer.global_step)
    return done + min(batches - done, steps_left * max(1, trainer.accumulate_grad_batches))


class StepBoundedRichProgressBar(RichProgressBar):
    """Rich progress bar, training total bounded by ``max_steps``."""

    @property
    def total_train_batches(self) -> int | float:
        return steps_bounded_total(self.trainer)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        """Resumed mid-epoch, Lightning skips the epoch start and makes the bar's task at the first batch's end,
        after that batch's step counted: make it here, where :func:`steps_bounded_total` holds."""
        super().on_train_batch_start(trainer, *args, **kwargs)
        if not self.is_disabled and self.progress is not None and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()


class StepBoundedTQDMProgressBar(TQDMProgressBar):
    """tqdm progress bar, training total bounded by ``max_steps``."""

    @property
    def total_train_batches(self) -> int | float:
        return steps_bounded_total(self.trainer)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        """Resumed mid-epoch, Lightning skips the epoch start that sets the bar's total: set it here."""
        super().on_train_batch_start(trainer, *args, **kwargs)
        bar = self.train_progress_bar
        if bar is not None and bar.total is None:
            bar.total = convert_inf(self.total_train_batches)
