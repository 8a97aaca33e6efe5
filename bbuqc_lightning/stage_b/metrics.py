"""Stage-B verdict metrics (SPEC §6), overall and per mission, as a torchmetrics ``Metric`` and a pure function.

Keys are ``<prefix><name>`` and ``<prefix><name>/<slug>``, e.g. ``val/false_pass_rate`` and
``val/false_pass_rate/bbu_grounding``, for the names

- ``false_pass_rate``  = #(label fail ∧ verdict pass) / #(label fail)   — 误放行率, the headline;
- ``false_fail_rate``  = #(label pass ∧ verdict fail) / #(label pass);
- ``accuracy``         = #(valid ∧ verdict == label) / #(labelled)      — an invalid answer is wrong;
- ``format_valid_rate`` = #valid / #answers, ``invalid_rate`` = #invalid / #answers.

Decisions:

1. A rate whose denominator is zero is *omitted* (no key), never NaN or 0: e.g. a mission with no
   fail-labelled groups has no ``false_pass_rate/<slug>``, so W&B charts show gaps, not fake values.
2. An invalid answer is never a pass nor a fail verdict: it lowers ``accuracy`` but counts in neither
   ``false_pass_rate`` nor ``false_fail_rate`` (it is routed to manual review instead).
3. Unlabelled groups (label ``None``) count only towards the format rates.
4. A mission outside ``missions`` counts in the overall rates but has no per-mission keys.

Both entry points share :func:`count_verdicts` (integer counts per mission) and :func:`rates_from_counts`;
the ``Metric`` keeps the counts as one sum-reduced tensor so DDP sync and ``merge_state`` are exact.

Example::

    >>> verdict_metrics(["pass", None], ["fail", "pass"], ["BBU接地线检查"] * 2, [True, False], prefix="val/")[
    ...     "val/false_pass_rate"]
    1.0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torchmetrics import Metric

from bbuqc_lightning.constants import MISSIONS, VERDICT_TO_LABEL

# Count columns, in order.
TOTAL, VALID, LABELLED, CORRECT, LABEL_FAIL, FALSE_PASS, LABEL_PASS, FALSE_FAIL = range(8)
NUM_COUNTS = 8

# name -> (numerator column or "invalid", denominator column)
_RATES: dict[str, tuple[int | str, int]] = {
    "false_pass_rate": (FALSE_PASS, LABEL_FAIL),
    "false_fail_rate": (FALSE_FAIL, LABEL_PASS),
    "accuracy": (CORRECT, LABELLED),
    "format_valid_rate": (VALID, TOTAL),
    "invalid_rate": ("invalid", TOTAL),
}
METRIC_NAMES: tuple[str, ...] = tuple(_RATES)


def _as_label(value: str | None) -> str | None:
    """``"pass"``/``"fail"`` from either label or verdict spelling; anything else -> ``None``."""
    if value in ("pass", "fail"):
        return value
    return VERDICT_TO_LABEL.get(value) if isinstance(value, str) else None


def _row_counts(verdict: str | None, label: str | None, valid: bool) -> list[int]:
    """Counts contributed by one answer."""
    row = [0] * NUM_COUNTS
    pred = _as_label(verdict) if valid else None
    row[TOTAL] = 1
    row[VALID] = int(bool(valid))
    if label is not None:
        row[LABELLED] = 1
        row[CORRECT] = int(pred is not None and pred == label)
        row[LABEL_FAIL] = int(label == "fail")
        row[FALSE_PASS] = int(label == "fail" and pred == "pass")
        row[LABEL_PASS] = int(label == "pass")
        row[FALSE_FAIL] = int(label == "pass" and pred == "fail")
    return row


def count_verdicts(
    verdicts: Sequence[str | None],
    labels: Sequence[str | None],
    missions: Sequence[str],
    valid: Sequence[bool],
    mission_names: Sequence[str],
) -> list[list[int]]:
    """Counts table of ``len(mission_names) + 1`` rows (last row: unknown missions) x ``NUM_COUNTS``.

    >>> count_verdicts(["pass"], ["fail"], ["m"], [True], ["m"])[0][FALSE_PASS]
    1
    """
    n = len(verdicts)
    if not (len(labels) == len(missions) == len(valid) == n):
        raise ValueError(
            f"length mismatch: {n} verdicts, {len(labels)} labels, {len(missions)} missions, {len(valid)} valid"
        )
    index = {name: i for i, name in enumerate(mission_names)}
    table = [[0] * NUM_COUNTS for _ in range(len(mission_names) + 1)]
    for verdict, label, mission, ok in zip(verdicts, labels, missions, valid, strict=True):
        label_norm = _as_label(label)
        if label is not None and label_norm is None:
            raise ValueError(f"unknown label {label!r}; expected 'pass', 'fail' or None")
        row = table[index.get(mission, len(mission_names))]
        for col, value in enumerate(_row_counts(verdict, label_norm, ok)):
            row[col] += value
    return table


def _rates(counts: Sequence[int]) -> dict[str, float]:
    """Rates of one counts row; a zero denominator omits the key."""
    out: dict[str, float] = {}
    for name, (num, den) in _RATES.items():
        denominator = counts[den]
        if denominator == 0:
            continue
        numerator = counts[TOTAL] - counts[VALID] if num == "invalid" else counts[int(num)]
        out[name] = numerator / denominator
    return out


def _normalise_prefix(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def rates_from_counts(
    table: Sequence[Sequence[int]], slugs: Sequence[str], prefix: str = ""
) -> dict[str, float]:
    """Overall rates (all rows summed) plus per-mission rates keyed ``<name>/<slug>``."""
    prefix = _normalise_prefix(prefix)
    overall = [sum(row[col] for row in table) for col in range(NUM_COUNTS)]
    out = {f"{prefix}{name}": value for name, value in _rates(overall).items()}
    for slug, row in zip(slugs, table, strict=False):  # the trailing "unknown" row has no slug
        out.update({f"{prefix}{name}/{slug}": value for name, value in _rates(row).items()})
    return out


def verdict_metrics(
    verdicts: Sequence[str | None],
    labels: Sequence[str | None],
    missions: Sequence[str],
    valid: Sequence[bool],
    prefix: str = "",
    mission_slugs: Mapping[str, str] = MISSIONS,
) -> dict[str, float]:
    """All SPEC §6 rates for one set of answers, without torch state (eval scripts, the runner)."""
    table = count_verdicts(verdicts, labels, missions, valid, list(mission_slugs))
    return rates_from_counts(table, list(mission_slugs.values()), prefix)


class VerdictMetrics(Metric):
    """Accumulates verdict counts across batches and processes; ``compute()`` returns the rates as tensors.

    >>> m = VerdictMetrics("test/")
    >>> m.update(["fail"], ["fail"], ["挡风板安装检查"], [True])
    >>> float(m.compute()["test/accuracy/baffle_installation"])
    1.0
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    counts: torch.Tensor

    def __init__(self, prefix: str = "", missions: Mapping[str, str] = MISSIONS, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.prefix = _normalise_prefix(prefix)
        self.mission_names = list(missions)
        self.slugs = list(missions.values())
        default = torch.zeros(len(self.mission_names) + 1, NUM_COUNTS, dtype=torch.long)
        self.add_state("counts", default=default, dist_reduce_fx="sum")

    def update(
        self,
        verdicts: Sequence[str | None],
        labels: Sequence[str | None],
        missions: Sequence[str],
        valid: Sequence[bool],
    ) -> None:
        table = count_verdicts(verdicts, labels, missions, valid, self.mission_names)
        self.counts += torch.tensor(table, dtype=torch.long, device=self.counts.device)

    def compute(self) -> dict[str, torch.Tensor]:
        rates = rates_from_counts(self.counts.tolist(), self.slugs, self.prefix)
        return {key: torch.tensor(value, dtype=torch.float32) for key, value in rates.items()}
