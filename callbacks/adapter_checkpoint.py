"""Save the LoRA adapter in peft format (``adapter_model.safetensors``) and log it as a W&B artifact.

The folder loads with ``PeftModel.from_pretrained(base_model, dirpath)``. Saved after every validation
and at the end of training, overwriting the same folder (Lightning checkpoints keep the history).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from bbuqc_lightning.tracking.wandb import log_artifact


class AdapterCheckpoint(Callback):
    """Writes ``module.model.save_pretrained(dirpath)`` on rank 0."""

    def __init__(self, dirpath: str, artifact_name: str = "lora_adapter") -> None:
        self.dirpath = Path(dirpath)
        self.artifact_name = artifact_name

    def _save(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        module.model.save_pretrained(str(self.dirpath))

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, module)
        if trainer.is_global_zero:
            log_artifact(trainer, self.dirpath, self.artifact_name, "model")
