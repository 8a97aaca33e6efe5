"""A resumable data order: samplers that know their epoch and position, and a loader Lightning checkpoints.

Lightning stores ``dataloader.state_dict()`` in every checkpoint and hands it back through
``load_state_dict`` on resume (its stateful-dataloader protocol). :class:`ResumableLoader` answers with
its sampler's ``(epoch, position)``, and a :class:`ResumableSampler` started again with those values
yields exactly the rows the uninterrupted run would have seen next. torchdata's ``StatefulDataLoader``
does the same for stock samplers, but draws its shuffle seed from the global RNG; ours is a pure
function of ``(seed, epoch)``, which also lets a checkpoint of one DDP world size resume under another.

Example::

    >>> sampler = EpochSampler(6, seed=0)
    >>> order = list(sampler)
    >>> sampler.resume(epoch=0, position=4)
    >>> list(sampler) == order[4:]
    True
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Sampler

log = logging.getLogger(__name__)


class ResumableSampler(Sampler[int]):
    """Yields this rank's indices of one epoch; :meth:`resume` makes the next iteration start mid-epoch.

    Subclasses define :meth:`epoch_order` (the whole epoch, identical on every rank) and ``num_samples``
    (this rank's share). Lightning calls :meth:`set_epoch` before every epoch; ``len`` is always the full
    epoch length (also after a resume, when the first ``position`` rows are skipped), as Lightning expects.
    """

    seed: int
    num_replicas: int
    rank: int
    num_samples: int

    def _init_resume(self, seed: int, num_replicas: int, rank: int) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.seed, self.num_replicas, self.rank = int(seed), num_replicas, rank
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def epoch_order(self, epoch: int) -> list[int]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rank_indices(self, epoch: int) -> list[int]:
        """This rank's slice of the epoch (strided, equal lengths on every rank)."""
        order = self.epoch_order(epoch)[: self.num_samples * self.num_replicas]
        return order[self.rank :: self.num_replicas]

    def resume(self, epoch: int, position: int, num_replicas: int | None = None) -> None:
        """Start the next iteration of ``epoch`` after ``position`` rows (counted on ``num_replicas`` ranks)."""
        if num_replicas and num_replicas != self.num_replicas:
            position = position * num_replicas // self.num_replicas
        self.epoch = int(epoch)
        self._resume = (int(epoch), max(0, int(position)))

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        yield from self.rank_indices(self.epoch)[start:]

    def __len__(self) -> int:
        return self.num_samples

    def state(self, position: int) -> dict[str, Any]:
        """What a checkpoint needs to resume this epoch after ``position`` consumed rows."""
        return {"epoch": self.epoch, "position": int(position), "num_replicas": self.num_replicas, "seed": self.seed}

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Warn when a checkpoint's sampler was built differently (its position then means other rows)."""
        if state.get("seed") != self.seed:
            log.warning(
                "the checkpoint's data order was seeded with %s, this run's with %s: resuming at the same "
                "position of a different order",
                state.get("seed"),
                self.seed,
            )


class EpochSampler(ResumableSampler):
    """Every row once per epoch: shuffled by ``numpy.random.default_rng([seed, epoch])``, or in order.

    Under DDP the epoch is cut to a multiple of the world size and rank ``r`` takes ``order[r::world]``,
    as ``DistributedSampler(drop_last=True)`` does.
    """

    def __init__(
        self, size: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0
    ) -> None:
        self._init_resume(seed, num_replicas, rank)
        self.size = size
        self.shuffle = shuffle
        self.num_samples = size // num_replicas

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.size).tolist()


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose ``state_dict`` Lightning stores in checkpoints.

    ``progress()`` returns the batches this epoch already *trained on* (Lightning's counter, which is
    right even when worker processes have fetched ahead); without it, batches handed out are counted.
    """

    def __init__(self, *args: Any, progress: Callable[[], int | None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress
        self._handed_out = 0

    def __iter__(self) -> Any:
        self._handed_out = 0
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        if not isinstance(self.sampler, ResumableSampler):  # Lightning swapped it (overfit_batches): no state
            return {}
        done = self.progress() if self.progress is not None else None
        batches = self._handed_out if done is None else done
        return self.sampler.state(position=batches * int(self.batch_size or 1))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        sampler = self.sampler
        if not state or not isinstance(sampler, ResumableSampler):
            return
        sampler.check_state(state)
        sampler.resume(int(state["epoch"]), int(state["position"]), state.get("num_replicas"))


def trained_batches(trainer: Any) -> int | None:
    """Batches of the current epoch the fit loop has trained on; ``None`` outside ``fit``."""
    if trainer is None or trainer.state.fn != TrainerFn.FITTING:
        return None
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed
