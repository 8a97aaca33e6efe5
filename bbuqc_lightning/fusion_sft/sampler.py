"""The fusion sampler: SPEC §9 quotas per epoch, seeded by ``(seed, epoch)``, DDP-sliced, resumable.

Quotas (fixed for a run, since they depend only on data sizes and ratios):

- a target contributes ``round(len x ratio)`` rows per epoch;
- a source contributes ``round(ratio x sum of target quotas)`` rows per epoch;
- ``round`` is Python's (half to even); a zero quota switches an entry off.

Drawing (a fresh ``numpy.random.default_rng([seed, epoch])`` per epoch, entries in file order):

- with replacement (the default): ``quota`` rows drawn i.i.d.; a row's probability is proportional to
  its weight, ``fail_oversample`` for rows labelled ``fail`` and 1 otherwise, times the weight of the first
  ``answer_oversample`` pattern the row's answer matches — so oversampling changes the *share*
  of those rows inside an entry's quota, never the quota (the mix stays as configured);
- ``sample_without_replacement: true``: ``quota // len`` full passes over the rows plus
  ``quota % len`` distinct rows (weighted the same way). With ratio 1 every row is seen exactly once,
  and ``fail_oversample`` then only matters for the partial pass.

The drawn rows of all entries are concatenated and shuffled together, so every batch mixes entries.

DDP: the epoch's list is cut to a multiple of the world size (at most ``world - 1`` rows are dropped;
which ones changes every epoch) and rank ``r`` takes ``list[r::world]``: disjoint, equal-length slices.

Length grouping (``data.group_by_length``, off by default), after the shuffle: the epoch's list is cut into groups
of ``group_rows`` consecutive rows, each group sorted longest first, and the epoch's longest row swapped to the
front (a batch too long for the GPU fails in the first step, not hours in). Batches then hold rows of similar
length, so far less of each batch is padding; the rows of the epoch, and (but for that one swap) the group each row
falls in, stay what the shuffle made them. This is ``transformers``' ``LengthGroupedSampler`` (megabatches of 50
batches), on our ``(seed, epoch)`` order, so resume stays exact; the lengths are each row's tokens
(:meth:`~bbuqc_lightning.fusion_sft.collator.SFTCollator.estimate_length`).

Resume: :meth:`FusionSampler.resume` makes the next iteration of ``epoch`` start at ``position`` (this
rank's rows already consumed). Because slices are strided, a checkpoint written with one world size
resumes under another one at the same global position (exactly when the positions divide evenly).

Example::

    >>> pools = [Pool("summary", "target", 10, 1.0), Pool("chat", "source", 50, 0.5)]
    >>> epoch_quotas(pools)
    {'summary': 10, 'chat': 5}
    >>> s = FusionSampler(pools, seed=0)
    >>> len(s), sorted(s.epoch_order(0)) == sorted(s.epoch_order(0))
    (15, True)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bbuqc_lightning.data.resumable import ResumableSampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pool:
    """What the sampler needs to know of one entry's training rows."""

    name: str
    role: str  # "target" | "source"
    size: int
    ratio: float
    without_replacement: bool = False
    # per-row draw weight (fail / answer oversampling); None = uniform
    weights: tuple[float, ...] | None = None


def epoch_quotas(pools: Sequence[Pool]) -> dict[str, int]:
    """Rows per epoch for every pool (SPEC §9); raises ``ValueError`` for a quota on an empty pool."""
    quotas = {p.name: round(p.size * p.ratio) for p in pools if p.role == "target"}
    total = sum(quotas.values())
    quotas |= {p.name: round(p.ratio * total) for p in pools if p.role == "source"}
    empty = [p.name for p in pools if p.size == 0 and (p.role == "source" and quotas[p.name] > 0)]
    if empty:
        raise ValueError(f"fusion sources {empty} have a quota but no rows")
    return {p.name: quotas[p.name] for p in pools}


def group_by_length(order: Sequence[int], lengths: Sequence[int], group_rows: int) -> list[int]:
    """``order`` cut into groups of ``group_rows``, each sorted longest first (ties keep their order); the epoch's
    longest row then swaps places with the first group's first row, as ``LengthGroupedSampler`` does, so the first
    batch is the longest (the group it came from is sorted again).

    >>> group_by_length([0, 1, 2, 3, 4], lengths=[5, 1, 9, 3, 7], group_rows=2)
    [2, 1, 0, 3, 4]
    """
    if group_rows <= 0:
        raise ValueError(f"group_rows must be > 0, got {group_rows}")

    def longest_first(rows: Sequence[int]) -> list[int]:
        return sorted(rows, key=lambda row: -lengths[row])

    groups = [longest_first(order[i : i + group_rows]) for i in range(0, len(order), group_rows)]
    if groups:
        longest = max(range(len(groups)), key=lambda g: lengths[groups[g][0]])
        if longest:
            groups[0][0], groups[longest][0] = groups[longest][0], groups[0][0]
            groups[longest] = longest_first(groups[longest])
    return [row for group in groups for row in group]


def draw(pool: Pool, quota: int, rng: np.random.Generator) -> np.ndarray:
    """``quota`` row indices of ``pool`` (see the module docstring for the two modes)."""
    if quota <= 0 or pool.size == 0:
        return np.zeros(0, dtype=np.int64)
    p = None
    if pool.weights is not None:
        weights = np.asarray(pool.weights, dtype=np.float64)
        p = weights / weights.sum()
    if not pool.without_replacement:
        return rng.choice(pool.size, size=quota, replace=True, p=p)
    full, rest = divmod(quota, pool.size)
    parts = [np.tile(np.arange(pool.size), full)]
    if rest:
        # A weighted draw without replacement needs at least `rest` rows of non-zero weight.
        if p is not None and np.count_nonzero(p) < rest:
            p = None
        parts.append(rng.choice(pool.size, size=rest, replace=False, p=p))
    return np.concatenate(parts).astype(np.int64)


class FusionSampler(ResumableSampler):
    """Yields global row indices (pools laid end to end, in order) for one rank, one epoch at a time.

    Resume and DDP slicing come from :class:`~bbuqc_lightning.data.resumable.ResumableSampler`.
    """

    def __init__(
        self,
        pools: Sequence[Pool],
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        lengths: Sequence[int] | None = None,
        group_rows: int = 0,
    ) -> None:
        self._init_resume(seed, num_replicas, rank)
        self.lengths = None if lengths is None else list(lengths)
        self.group_rows = group_rows if lengths is not None else 0
        self.pools = list(pools)
        self.quotas = epoch_quotas(self.pools)
        self.offsets = np.cumsum([0] + [p.size for p in self.pools])[:-1]
        self.total = sum(self.quotas.values())
        self.num_samples = self.total // num_replicas
        if self.num_samples == 0:
            raise ValueError(
                f"the fusion epoch has {self.total} rows for {num_replicas} rank(s); quotas: {self.quotas}"
            )

    def epoch_order(self, epoch: int) -> list[int]:
        """The whole epoch's global indices, shuffled (all ranks compute the same list)."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        parts = [
            self.offsets[i] + draw(pool, self.quotas[pool.name], rng) for i, pool in enumerate(self.pools)
        ]
        order = np.concatenate(parts)[rng.permutation(self.total)].tolist()
        if self.lengths is not None:
            return group_by_length(order, self.lengths, self.group_rows)
        return order

    def state(self, position: int) -> dict[str, Any]:
        return {**super().state(position), "quotas": dict(self.quotas), "group_rows": self.group_rows}

    def check_state(self, state: Mapping[str, Any]) -> None:
        saved = (state.get("seed"), dict(state.get("quotas", {})), state.get("group_rows", 0))
        if saved != (self.seed, self.quotas, self.group_rows):
            log.warning(
                "the checkpoint's fusion sampler (seed %s, quotas %s, length groups of %s rows) differs from this "
                "run's (seed %s, quotas %s, length groups of %s rows; 0: none): resuming at the same position of a "
                "different epoch order",
                *saved,
                self.seed,
                self.quotas,
                self.group_rows,
            )
