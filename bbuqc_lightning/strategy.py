"""Lightning's single-device strategy without the move of the model back to host memory at the end of a run.

``Strategy.teardown`` moves the model to the CPU when ``predict`` / ``validate`` / ``test`` ends, to free the GPU
for whatever the process does next. A run of this project's entry point that does not train (Stage-A's
``predict``; eval's and the end-to-end evaluation's ``test``) ends there, so the move only costs time: a 4B
model is ~9 GB copied into fresh host memory, and Stage-A spent 5-6 s after its last batch on one H100
(docs/BENCHMARKS.md). ``fit`` keeps Lightning's behaviour (what follows a training run may want the GPU free), and
so do the runner and distillation, whose rounds run in ``fit``.

Why not ``Trainer(strategy=KeepOnDeviceStrategy(device=...))`` in ``conf/trainer/gpu.yaml``: the device would be
written twice (``trainer.devices`` picks it), so :func:`keep_model_on_device` changes the class of the strategy
Lightning chose itself, and only when that is the plain single-device one.
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import SingleDeviceStrategy


class KeepOnDeviceStrategy(SingleDeviceStrategy):
    """:class:`~lightning.pytorch.strategies.SingleDeviceStrategy` whose teardown leaves the model where it ran
    (optimizers, the precision plugin, the accelerator and checkpoint IO are torn down as before)."""

    def teardown(self) -> None:
        # Strategy.teardown moves only a module it holds: hide it for the call
        module, self._lightning_module = self._lightning_module, None
        try:
            super().teardown()
        finally:
            self._lightning_module = module


def keep_model_on_device(trainer: Trainer) -> None:
    """Make ``trainer``'s strategy a :class:`KeepOnDeviceStrategy` where Lightning chose its plain single-device
    strategy (one GPU or the CPU; the class changes, the object and its state stay); any other is left as it is."""
    if type(trainer.strategy) is SingleDeviceStrategy:
        trainer.strategy.__class__ = KeepOnDeviceStrategy
