"""Learning-rate logging that tolerates ``logger=none`` (Lightning's monitor refuses to run without one)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor


class OptionalLearningRateMonitor(LearningRateMonitor):
    """Lightning's ``LearningRateMonitor``, switched off when the trainer has no logger."""

    def on_train_start(self, trainer: L.Trainer, *args: object, **kwargs: object) -> None:
        self._active = bool(trainer.loggers)
        if self._active:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args: object, **kwargs: object) -> None:
        if getattr(self, "_active", False):
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: object, **kwargs: object) -> None:
        if getattr(self, "_active", False):
            super().on_train_epoch_start(trainer, *args, **kwargs)
