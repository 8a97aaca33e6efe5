"""SIGTERM / SIGINT: finish the item in hand, write what it produced, stop, exit non-zero.

A scheduler sends SIGTERM some seconds before it kills a job; an operator presses Ctrl+C. Either way
the run should end with nothing half-written and a resumable state:

- ``fit``: the batch in hand finishes, then ``trainer.should_stop`` ends the loop the ordinary way, so
  ``last.ckpt`` (marked mid-epoch, see :mod:`bbuqc_lightning.tracking.checkpoint`) and the adapter are
  written; ``ckpt_path=<run>/checkpoints/last.ckpt`` resumes from there.
- ``predict`` / ``validate`` / ``test`` (and validation inside ``fit``): the batch in hand finishes and its
  outputs are written by the callbacks (Stage-A's JSONL line is flushed and fsynced per group); the next
  batch start raises :class:`Interrupted`; a rerun into the same output resumes.

``train()`` then finishes W&B and writes ``metrics.json`` as after any failure, and the command line exits
with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), as a shell reports a process killed by it. A second
signal while stopping raises ``KeyboardInterrupt`` at once (an operator who insists gets the default).
Lightning's own SIGTERM handler only stops ``fit``, by a ``SystemExit`` with code 0 and without ``last.ckpt``;
ours replaces it for the run, and the previous handlers are restored after. Under DDP each rank stops on
its own signal, so every rank must receive it (schedulers signal the whole job; a signal to one rank only
is not relayed to the others).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(RuntimeError):
    """The run stopped on a signal after the item in hand; ``exit_code`` is ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped on {name} after the item in hand; rerun (or resume from last.ckpt) to continue"
        )


class StopOnSignal(L.Callback):
    """Turns a signal into a stop at the next batch boundary (see the module docstring)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: finishing the item in hand, then stopping", signal.Signals(signum).name)

    def install(self) -> None:
        """Route SIGTERM and SIGINT here (only the main thread may set signal handlers)."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, self.handle)

    # Lightning registers its own SIGTERM handler (which ends fit with exit code 0 and no last.ckpt) just
    # before a stage's loop starts; these hooks run after it, so ours wins.
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()

    def _check(self, trainer: L.Trainer) -> None:
        if self.signum is None:
            return
        if trainer.training:
            # Stop after a batch that ends its gradient-accumulation window (or the epoch), never inside one: the
            # checkpoint counts the window's batches as trained, so the rest of a cut window would be lost.
            progress = trainer.fit_loop.epoch_loop.batch_progress
            if progress.current.ready % trainer.accumulate_grad_batches == 0 or progress.is_last_batch:
                trainer.should_stop = True
        else:
            raise Interrupted(self.signum)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._check(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._check(trainer)

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._check(trainer)

    def on_test_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._check(trainer)

    def on_predict_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._check(trainer)

    def raise_if_stopped(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


@contextmanager
def stop_on_signals(trainer: L.Trainer) -> Iterator[StopOnSignal]:
    """Add a :class:`StopOnSignal` to ``trainer`` and route SIGTERM/SIGINT to it for the ``with`` block."""
    stopper = StopOnSignal()
    trainer.callbacks.append(stopper)
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in SIGNALS} if main else {}
    try:
        stopper.install()
        yield stopper
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
