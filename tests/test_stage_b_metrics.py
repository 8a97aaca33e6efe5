"""Stage-B metrics (SPEC §6): known counts per mission, zero denominators, and state reduction."""

from __future__ import annotations

import pytest
import torch

from bbuqc_lightning.constants import MISSIONS
from bbuqc_lightning.stage_b.metrics import METRIC_NAMES, VerdictMetrics, verdict_metrics

GROUND, CABLE, BAFFLE = "BBU接地线检查", "BBU线缆布放要求", "挡风板安装检查"

# (verdict, label, mission, valid)
ROWS = [
    # grounding: 4 fail-labelled (2 false passes, 1 invalid), 2 pass-labelled (1 false fail)
    ("pass", "fail", GROUND, True),
    ("pass", "fail", GROUND, True),
    ("fail", "fail", GROUND, True),
    (None, "fail", GROUND, False),
    ("pass", "pass", GROUND, True),
    ("fail", "pass", GROUND, True),
    # cabling: only pass-labelled, all correct
    ("pass", "pass", CABLE, True),
    ("通过", "pass", CABLE, True),  # the Chinese spelling is accepted too
    # baffle: one unlabelled answer (format rates only)
    ("fail", None, BAFFLE, True),
]


def _columns(rows):
    verdicts, labels, missions, valid = (list(col) for col in zip(*rows, strict=True))
    return verdicts, labels, missions, valid


def test_known_counts_overall_and_per_mission() -> None:
    m = verdict_metrics(*_columns(ROWS), prefix="val/")
    assert m["val/false_pass_rate"] == pytest.approx(2 / 4)
    assert m["val/false_fail_rate"] == pytest.approx(1 / 4)
    assert m["val/accuracy"] == pytest.approx(4 / 8)
    assert m["val/format_valid_rate"] == pytest.approx(8 / 9)
    assert m["val/invalid_rate"] == pytest.approx(1 / 9)
    assert m["val/false_pass_rate/bbu_grounding"] == pytest.approx(2 / 4)
    assert m["val/false_fail_rate/bbu_grounding"] == pytest.approx(1 / 2)
    assert m["val/accuracy/bbu_grounding"] == pytest.approx(2 / 6)
    assert m["val/invalid_rate/bbu_grounding"] == pytest.approx(1 / 6)
    assert m["val/accuracy/bbu_cabling"] == 1.0
    assert m["val/false_fail_rate/bbu_cabling"] == 0.0


def test_zero_denominators_omit_keys() -> None:
    m = verdict_metrics(*_columns(ROWS), prefix="val")  # a prefix without "/" gets one
    assert "val/false_pass_rate/bbu_cabling" not in m  # no fail-labelled cabling groups
    assert "val/accuracy/baffle_installation" not in m  # only an unlabelled group
    assert m["val/format_valid_rate/baffle_installation"] == 1.0
    assert not any(k.endswith("/bbu_installation") for k in m)  # no groups at all
    assert verdict_metrics([], [], [], []) == {}


def test_invalid_answer_is_never_a_pass_even_if_a_verdict_is_given() -> None:
    m = verdict_metrics(["pass"], ["fail"], [GROUND], [False])
    assert m["false_pass_rate"] == 0.0 and m["accuracy"] == 0.0 and m["invalid_rate"] == 1.0


def test_unknown_mission_counts_overall_only() -> None:
    m = verdict_metrics(["pass"], ["pass"], ["其他任务"], [True], prefix="test/")
    assert m == {
        "test/false_fail_rate": 0.0,
        "test/accuracy": 1.0,
        "test/format_valid_rate": 1.0,
        "test/invalid_rate": 0.0,
    }


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="length mismatch"):
        verdict_metrics(["pass"], [], [], [])
    with pytest.raises(ValueError, match="unknown label"):
        verdict_metrics(["pass"], ["maybe"], [GROUND], [True])


def test_metric_matches_pure_function_across_batches() -> None:
    metric = VerdictMetrics(prefix="train/")
    metric.update(*_columns(ROWS[:4]))
    metric.update(*_columns(ROWS[4:]))
    computed = {k: float(v) for k, v in metric.compute().items()}
    assert computed == pytest.approx(verdict_metrics(*_columns(ROWS), prefix="train/"))
    assert all(v.dtype == torch.float32 for v in metric.compute().values())


def test_merged_states_equal_one_metric() -> None:
    one, left, right = VerdictMetrics("val/"), VerdictMetrics("val/"), VerdictMetrics("val/")
    one.update(*_columns(ROWS))
    left.update(*_columns(ROWS[:5]))
    right.update(*_columns(ROWS[5:]))
    left.merge_state(right)
    assert torch.equal(left.counts, one.counts)
    assert {k: float(v) for k, v in left.compute().items()} == {k: float(v) for k, v in one.compute().items()}


def test_sum_reduction_of_counts_state() -> None:
    """What DDP sync does: the registered reduction sums the per-process count tensors."""
    left, right, one = VerdictMetrics(), VerdictMetrics(), VerdictMetrics()
    left.update(*_columns(ROWS[:3]))
    right.update(*_columns(ROWS[3:]))
    one.update(*_columns(ROWS))
    reduce = left._reductions["counts"]
    assert torch.equal(reduce(torch.stack([left.counts, right.counts])), one.counts)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_reset_and_metric_names() -> None:
    metric = VerdictMetrics("test/")
    metric.update(*_columns(ROWS))
    metric.reset()
    assert metric.compute() == {}
    assert METRIC_NAMES == (
        "false_pass_rate",
        "false_fail_rate",
        "accuracy",
        "format_valid_rate",
        "invalid_rate",
    )
    assert len(MISSIONS) + 1 == metric.counts.shape[0]
