"""Save a fully fine-tuned model as one folder that ``from_pretrained`` and the model factory load.

For fusion SFT with ``module.finetune=full`` (no adapter to save): the folder holds the weights, the
config, the generation config and the processor (tokenizer, image processor, the project's chat
template), like a ``tools/export.py`` output, so a later run starts from it with
``model.model_name_or_path=<run>/model model.random_init=false``. Saved after every validation and at the
end of training, overwriting the same folder (Lightning checkpoints keep the history). Modules that train
LoRA adapters are left to ``bbuqc_lightning.callbacks.adapter_checkpoint.AdapterCheckpoint``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from peft import PeftModel

from bbuqc_lightning.models.factory import save_model_folder
from bbuqc_lightning.tracking.wandb import log_artifact

log = logging.getLogger(__name__)


class ModelFolderCheckpoint(Callback):
    """Writes ``module.model`` and ``module.processor`` to ``dirpath`` on rank 0 (full fine-tuning only).

    ``log_artifact`` uploads the folder to W&B at the end (off by default: a full model is large).
    """

    def __init__(self, dirpath: str, log_artifact: bool = False, artifact_name: str = "model") -> None:
        self.dirpath = Path(dirpath)
        self.log_artifact = log_artifact
        self.artifact_name = artifact_name

    @staticmethod
    def applies_to(module: L.LightningModule) -> bool:
        """True when the module trains a whole model (no peft adapters)."""
        return not isinstance(getattr(module, "model", None), PeftModel)

    def _save(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.applies_to(module):
            return
        processor = getattr(module, "processor", None)
        if processor is None:
            raise ValueError(
                f"{type(module).__name__} has no 'processor' attribute: ModelFolderCheckpoint cannot write a "
                "folder that loads on its own"
            )
        save_model_folder(module.model, processor, self.dirpath)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, module)
        if trainer.is_global_zero and self.applies_to(module):
            log.info("model folder written to %s", self.dirpath)
            if self.log_artifact:
                log_artifact(trainer, self.dirpath, self.artifact_name, "model")
