"""Reading what eval runs left behind: counts and rates per mission from ``predictions.jsonl`` (checked
against ``metrics.json``), logged series from the CSV log, and the data set's shape."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bbuqc_lightning.constants import MISSIONS
from proof.runs import read_json

METRICS = ("format_valid_rate", "accuracy", "false_pass_rate", "false_fail_rate")


def verdict_counts(predictions: Path) -> dict[str, dict[str, int]]:
    """Counts behind the rates, per mission slug and ``all``, from an eval run's ``predictions.jsonl``."""
    names = (
        "groups",
        "valid",
        "truncated",
        "correct",
        "label_fail",
        "false_pass",
        "label_pass",
        "false_fail",
    )
    counts = {scope: dict.fromkeys(names, 0) for scope in ("all", *MISSIONS.values())}
    for line in predictions.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        verdict = row["verdict"] if row["valid"] else None
        for scope in ("all", MISSIONS.get(row["mission"])):
            if scope is None:
                continue
            c = counts[scope]
            c["groups"] += 1
            c["valid"] += bool(row["valid"])
            c["truncated"] += bool(row["truncated"])  # hit max_new_tokens (may still parse as valid)
            c["correct"] += verdict is not None and verdict == row["label"]
            c["label_fail"] += row["label"] == "fail"
            c["false_pass"] += row["label"] == "fail" and verdict == "pass"
            c["label_pass"] += row["label"] == "pass"
            c["false_fail"] += row["label"] == "pass" and verdict == "fail"
    return counts


_FRACTIONS = {
    "format_valid_rate": ("valid", "groups"),
    "accuracy": ("correct", "groups"),
    "false_pass_rate": ("false_pass", "label_fail"),
    "false_fail_rate": ("false_fail", "label_pass"),
}


def eval_results(run_dir: Path, prefix: str = "test") -> dict[str, dict[str, Any]]:
    """``{scope: {metric: rate, metric_n: "k/n", ...}}`` from ``metrics.json``, checked against the counts.

    ``prefix``: ``test`` for ``+experiment=eval``, ``e2e`` for ``+experiment=e2e`` (same ``predictions.jsonl``).
    """
    metrics = read_json(run_dir / "metrics.json")
    counts = verdict_counts(run_dir / "predictions.jsonl")
    out: dict[str, dict[str, Any]] = {}
    for scope, c in counts.items():
        row: dict[str, Any] = {"counts": c}
        for name in METRICS:
            key = f"{prefix}/{name}" if scope == "all" else f"{prefix}/{name}/{scope}"
            num, den = _FRACTIONS[name]
            value = metrics.get(key)
            if value is not None and den and abs(value - c[num] / c[den]) > 1e-6:
                raise RuntimeError(f"{run_dir}: {key}={value} disagrees with predictions.jsonl")
            row[name] = value
            row[f"{name}_n"] = f"{c[num]}/{c[den]}"
        out[scope] = row
    return out


def csv_series(run_dir: Path, keys: Sequence[str]) -> dict[str, list[float]]:
    """Logged values of ``keys`` in step order from the run's ``csv/metrics.csv``."""
    path = run_dir / "csv" / "metrics.csv"
    series: dict[str, list[float]] = {k: [] for k in keys}
    if not path.is_file():
        return series
    with path.open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            for key in keys:
                if row.get(key) not in (None, ""):
                    series[key].append(float(row[key]))
    return series


def head_tail(values: Sequence[float], share: float = 0.1) -> dict[str, float | None]:
    """Mean of the first and the last ``share`` of ``values`` (at least one each)."""
    if not values:
        return {"first": None, "last": None, "n": 0}
    k = max(1, round(len(values) * share))
    return {"first": sum(values[:k]) / k, "last": sum(values[-k:]) / k, "n": len(values)}


def training_summary(run_dir: Path, keys: Sequence[str]) -> dict[str, Any]:
    series = csv_series(run_dir, keys)
    return {key: head_tail(values) for key, values in series.items()}


def data_summary(data_dir: Path) -> dict[str, Any]:
    """Groups per split and how many test tickets repeat a training ticket word for word."""
    synthetic = data_dir / "synthetic"
    manifest = read_json(synthetic / "manifest.json")

    def keys(split: str) -> list[tuple[str, tuple[str, ...]]]:
        lines = (synthetic / f"stage_a_{split}.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines]
        return [(r["mission"], tuple(r["per_image"].values())) for r in rows]

    train = set(keys("train"))
    test = keys("test")
    return {
        "splits": {s: {"groups": v["groups"], "images": v["images"]} for s, v in manifest["splits"].items()},
        "test_tickets_seen_in_train": sum(k in train for k in test),
    }


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"
