"""Lightning checkpoints that hold only what training changes: the trainable (LoRA) weights and RNG state.

The frozen base (gigabytes for a 4B model) is rebuilt from ``model.model_name_or_path`` on resume, so a
checkpoint is the size of the adapters; the RNG state makes the next step reproduce exactly.
"""

from __future__ import annotations

from typing import Any

from bbuqc_lightning.tracking.rng import rng_state, set_rng_state


class TrainableStateCheckpointing:
    """Mixin for a ``LightningModule``; set ``self.strict_loading = False`` in its ``__init__``."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}  # type: ignore[attr-defined]
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["rng_state"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_state" in checkpoint:
            set_rng_state(checkpoint["rng_state"])
