"""A callback for ``bench/fusion_sft.py``: each training step's time and tokens, written as JSON when training ends.

Each step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` with the GPU synchronised at both ends
(without it the host returns before the kernels finish), so data loading between steps is not counted. Tokens:
``real`` (the attention mask's ones) and ``padded`` (the batch's rows times its longest). Peak GPU memory is the
process's own (allocated by tensors, and reserved by the caching allocator).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch


class StepTimer(L.Callback):
    def __init__(self, out: str, warmup: int = 5) -> None:
        self.out, self.warmup = Path(out), warmup
        self.steps: list[dict[str, float]] = []
        self._start = 0.0

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._sync(trainer)
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sync(trainer)
        ids = batch["input_ids"]
        self.steps.append(
            {
                "seconds": time.perf_counter() - self._start,
                "rows": int(ids.shape[0]),
                "padded": int(ids.numel()),
                "real": int(batch["attention_mask"].sum()),
            }
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(summary(self.steps, self.warmup), indent=2) + "\n", encoding="utf-8")


def summary(steps: list[dict[str, float]], warmup: int) -> dict[str, Any]:
    """Rates over the steps after the first ``warmup`` (all of them when there are no more)."""
    timed = steps[warmup:] or steps
    seconds = sum(s["seconds"] for s in timed)
    out: dict[str, Any] = {
        "steps": len(steps),
        "timed_steps": len(timed),
        "median_step_s": statistics.median(s["seconds"] for s in timed) if timed else None,
        "rows_per_s": sum(s["rows"] for s in timed) / seconds if seconds else None,
        "real_tokens_per_s": sum(s["real"] for s in timed) / seconds if seconds else None,
        "padding_share": 1 - sum(s["real"] for s in steps) / max(1, sum(s["padded"] for s in steps)),
        "first_step_s": steps[0]["seconds"] if steps else None,
    }
    if torch.cuda.is_available():
        out["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["max_memory_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    return out
