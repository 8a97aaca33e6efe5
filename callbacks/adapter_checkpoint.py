"""Save the LoRA adapter in peft format (``adapter_model.safetensors``) and log it as a W&B artifact.

The folder loads with ``PeftModel.from_pretrained(base_model, dirpath)``. Saved after every validation
and at the end of training, overwriting the same folder (Lightning checkpoints keep the history). A module
without adapters (fusion SFT with ``module.finetune=full``) is left to
``callbacks.model_folder.ModelFolderCheckpoint``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from peft import PeftModel

from bbuqc_lightning.tracking.wandb import log_artifact


class AdapterCheckpoint(Callback):
    """Writes ``module.model.save_pretrained(dirpath)`` on rank 0."""

    def __init__(self, dirpath: str, artifact_name: str = "lora_adapter") -> None:
        self.dirpath = Path(dirpath)
        self.artifact_name = artifact_name

    @staticmethod
    def applies_to(module: L.LightningModule) -> bool:
        """True when the module trains peft adapters."""
        return isinstance(getattr(module, "model", None), PeftModel)

    def _save(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.applies_to(module):
            return
        module.model.save_pretrained(str(self.dirpath))

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, module)
        if trainer.is_global_zero and self.applies_to(module):
            log_artifact(trainer, self.dirpath, self.artifact_name, "model")
