"""Save the LoRA adapter in peft format (``adapter_model.safetensors``) and log it as a W&B artifact.

The folder loads with ``PeftModel.from_pretrained(base_model, dirpath)``. Saved after every validation
and at the end of training, overwriting the same folder (Lightning checkpoints keep the history). A module
without adapters (fusion SFT with ``module.finetune=full``) is left to
``bbuqc_lightning.callbacks.model_folder.ModelFolderCheckpoint``.

Beside the adapter, ``bbuqc_base.json`` says how to rebuild its base: the model preset, the model config
(a real folder or hub id in ``model_name_or_path``; for a random-init base the ``architecture`` and
``seed``) and any adapter merged into the base before training (fusion SFT ``module.init.adapter`` with
``adapter_mode: merge``). peft's own ``base_model_name_or_path`` is ``null`` for a random-init base;
``tools/export.py`` reads this file when ``--base`` is omitted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel

from bbuqc_lightning.tracking.wandb import log_artifact

BASE_FILE = "bbuqc_base.json"


class AdapterCheckpoint(Callback):
    """Writes ``module.model.save_pretrained(dirpath)`` and ``bbuqc_base.json`` on rank 0."""

    def __init__(
        self,
        dirpath: str,
        artifact_name: str = "lora_adapter",
        base_model: Mapping[str, Any] | DictConfig | None = None,
        base_preset: str | None = None,
        init_adapter: str | None = None,
        init_adapter_mode: str | None = None,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.artifact_name = artifact_name
        self.base = base_description(base_model, base_preset, init_adapter, init_adapter_mode)

    @staticmethod
    def applies_to(module: L.LightningModule) -> bool:
        """True when the module trains peft adapters."""
        return isinstance(getattr(module, "model", None), PeftModel)

    def _save(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.applies_to(module):
            return
        module.model.save_pretrained(str(self.dirpath))
        if self.base is not None:
            text = json.dumps(self.base, indent=2, ensure_ascii=False) + "\n"
            (self.dirpath / BASE_FILE).write_text(text, encoding="utf-8")

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, module)
        if trainer.is_global_zero and self.applies_to(module):
            log_artifact(trainer, self.dirpath, self.artifact_name, "model")


def base_description(
    model: Mapping[str, Any] | DictConfig | None,
    preset: str | None,
    init_adapter: str | None,
    init_adapter_mode: str | None,
) -> dict[str, Any] | None:
    """What ``bbuqc_base.json`` holds (None when the run did not say what its base is)."""
    if model is None:
        return None
    resolved = OmegaConf.to_container(model, resolve=True) if isinstance(model, DictConfig) else dict(model)
    assert isinstance(resolved, dict)
    resolved.pop("_target_", None)
    name = resolved.get("model_name_or_path")
    if isinstance(name, str) and Path(name).expanduser().exists():
        resolved["model_name_or_path"] = str(Path(name).expanduser().resolve())
    merged = [str(Path(init_adapter).resolve())] if init_adapter and init_adapter_mode == "merge" else []
    return {"preset": preset, "model": resolved, "merged_adapters": merged}
