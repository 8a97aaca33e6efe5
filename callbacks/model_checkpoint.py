"""Lightning's ``ModelCheckpoint``, with ``last.ckpt`` written whenever training ends after a step no checkpoint saved.

Lightning's own ``on_train_end`` writes ``last.ckpt`` only when no checkpoint at all was saved during the run: once a
periodic one (``every_n_train_steps``) exists, a run that ends at ``max_steps`` or on a signal (SIGTERM: finish
the step in hand, then stop) between two periodic saves leaves ``last.ckpt`` at the last periodic step, and a
resume from it trains the steps after it again. Here ``last.ckpt`` is rewritten at the end unless it already holds
the final step.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class LastAtEndCheckpoint(ModelCheckpoint):
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)
