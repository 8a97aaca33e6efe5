"""Lightning's ``WandbLogger`` without the one warning it makes W&B print on every run.

Lightning 2.6 always passes ``anonymous=None`` to ``wandb.init``; W&B 0.31 answers any explicit value with
"The anonymous setting has no effect and will be removed". Nothing else differs.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger


class QuietWandbLogger(WandbLogger):
    """``WandbLogger`` that leaves ``anonymous`` unset (W&B's default) unless it was asked for."""

    def __init__(self, *args: Any, anonymous: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, anonymous=anonymous, **kwargs)
        if not anonymous:
            self._wandb_init.pop("anonymous", None)
