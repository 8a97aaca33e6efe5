"""Fusion SFT as a LightningModule (``+experiment=fusion_sft``, SPEC §9).

One model learns several tasks at once from a ratio-weighted mix (:mod:`bbuqc_lightning.fusion_sft.datamodule`):
Stage-A summaries and dense captions (image + text), Stage-B verdicts distilled from the Teacher and
general chat (text only). Loss on assistant tokens only (:mod:`.loss`), row weights honoured; LoRA on the
last K LLM layers (or, with ``finetune="full"``, every language-model weight), vision tower and aligner
frozen; start from a base, a merged folder, or a base + an adapter (:mod:`.init`). Automatic optimisation:
gradient clipping and accumulation come from the trainer (``trainer.gradient_clip_val``,
``trainer.accumulate_grad_batches``).

Logged: ``train/loss`` (the optimised, row-weighted loss), ``train/loss/<name>`` (token-mean CE of the
batch's rows of data set ``name``; rank-local under DDP), ``train/tokens``, ``train/truncated``;
``val/loss/<target>`` and ``val/loss`` (token means over each target's whole val set, summed over ranks).
Checkpoints hold only the trainable weights (LoRA, or the whole language model when ``full``), the RNG
states and the sampler position (exact mid-epoch resume). The result is written by callbacks: the LoRA
adapter by ``bbuqc_lightning.callbacks.adapter_checkpoint.AdapterCheckpoint`` (``adapter/``), a fully fine-tuned model as
one ``from_pretrained`` folder with its processor by ``bbuqc_lightning.callbacks.model_folder.ModelFolderCheckpoint``
(``model/``, usable as ``model.model_name_or_path`` of a later run).

Commands::

    python -m bbuqc_lightning.train +experiment=fusion_sft                      # tiny model, synthetic mix
    python -m bbuqc_lightning.train +experiment=fusion_sft model=qwen3_vl_4b trainer=gpu \\
        model.model_name_or_path=/models/summary-merged data.fusion=/data/fusion/bbu_stageb.yaml
    python -m bbuqc_lightning.train +experiment=fusion_sft module.lora.k=36     # LoRA on every layer
    python -m bbuqc_lightning.train +experiment=fusion_sft module.finetune=full  # the whole LLM trains
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch

from bbuqc_lightning.fusion_sft.init import build_trainable_model
from bbuqc_lightning.fusion_sft.loss import group_token_means, per_sample_token_losses, weighted_token_mean
from bbuqc_lightning.models.decoder import base_model, output_embedding
from bbuqc_lightning.models.factory import ModelBundle
from bbuqc_lightning.tracking.checkpoint import TrainableStateCheckpointing

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


class FusionSFTModule(TrainableStateCheckpointing, L.LightningModule):
    """Supervised fine-tuning on fusion batches: LoRA on the last K LLM layers, or the whole LLM."""

    def __init__(
        self,
        bundle: ModelBundle,
        optimizer: Callable[..., torch.optim.Optimizer],
        lora: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        init: Mapping[str, Any] | None = None,
        scheduler: Callable[..., Any] | None = None,
        gradient_checkpointing: bool = False,
        finetune: str = "lora",
        freeze_vision: bool = True,
    ) -> None:
        super().__init__()
        init = dict(init or {})
        self.model = build_trainable_model(
            bundle.model,
            lora,
            init.get("adapter"),
            init.get("adapter_mode", "merge"),
            finetune,
            freeze_vision,
        )
        self.freeze_vision = freeze_vision
        self.processor = bundle.processor  # saved beside a fully fine-tuned model (ModelFolderCheckpoint)
        if gradient_checkpointing:
            self.model.enable_input_require_grads()
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.strict_loading = False  # checkpoints hold only the trainable weights
        self._val_sums: dict[str, list[torch.Tensor]] = {}

    def setup(self, stage: str) -> None:
        """Refuse a trainable vision tower under DDP without ``find_unused_parameters``: a batch without photos
        never calls the tower, and DDP then waits for gradients that never come (Lightning's error says only
        that some parameters did not take part). ``_ddp_kwargs`` is how ``DDPStrategy`` holds them."""
        ddp_kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None)
        ddp = ddp_kwargs is not None and self.trainer.world_size > 1
        if stage == "fit" and not self.freeze_vision and ddp and not ddp_kwargs.get("find_unused_parameters"):
            raise ValueError(
                "module.freeze_vision=false under DDP: a batch without photos leaves the vision tower without "
                "gradients; use trainer.strategy=ddp_find_unused_parameters_true"
            )

    # ---------------------------------------------------------------- forward
    def token_losses(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``(loss_sum, n_assistant_tokens)`` of a collated batch."""
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        hidden = base_model(self.model).model(**inputs).last_hidden_state
        return per_sample_token_losses(hidden, output_embedding(self.model).weight, batch["labels"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        sums, counts = self.token_losses(batch)
        loss = weighted_token_mean(sums, counts, batch["weights"])
        rows = len(batch["datasets"])
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=rows)
        logs = {
            "train/tokens": counts.sum(),
            "train/truncated": batch["num_truncated"].float(),
        }
        for name, (total, n) in group_token_means(sums, counts, batch["datasets"]).items():
            if n > 0:
                logs[f"train/loss/{name}"] = total / n
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=rows)
        return loss

    # ------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        sums, counts = self.token_losses(batch)
        for name, (total, n) in group_token_means(sums, counts, batch["datasets"]).items():
            acc = self._val_sums.setdefault(name, [sums.new_zeros(()), sums.new_zeros(())])
            acc[0] += total
            acc[1] += n

    def on_validation_epoch_end(self) -> None:
        names = self._val_names()
        if not names:
            return
        zero = torch.zeros((), device=self.device)
        stacked = torch.stack([torch.stack(self._val_sums.get(n, [zero, zero])) for n in names])
        if self.trainer.world_size > 1:
            stacked = self.trainer.strategy.reduce(stacked, reduce_op="sum")
        logs = {f"val/loss/{n}": float(s / c) for n, (s, c) in zip(names, stacked, strict=True) if c > 0}
        total = stacked.sum(dim=0)
        if total[1] > 0:
            logs["val/loss"] = float(total[0] / total[1])
        self.log_dict(logs, on_epoch=True)  # floats, already summed over ranks: nothing left to sync

    def _val_names(self) -> list[str]:
        """Every rank must reduce the same names: take them from the DataModule when it has them."""
        datamodule = getattr(self.trainer, "datamodule", None)
        val_rows = getattr(datamodule, "val_rows", None)
        return sorted(val_rows) if isinstance(val_rows, dict) else sorted(self._val_sums)

    # -------------------------------------------------------------- plumbing
    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
