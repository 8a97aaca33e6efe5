"""Results of the drift/cure pipeline: per stage and seed, then mean and spread over seeds, as JSON, markdown
and one plot (false-pass rate by stage and mission).

Per stage (``base``, ``drift``, ``cure_a``, ``cure_b``, ``cure_b_penalty``) and seed, from the stage's eval
folders: Stage-B from reference summaries (``test/*`` of ``+experiment=eval``), end to end (``e2e/*`` of
``+experiment=e2e``), Stage-A object F1 / exact match of the model's own summaries (``stage_a/*`` of the
same e2e run) with the findings its summaries kept, photo by photo (``stage_a.jsonl`` against the references),
and false passes split by the seed's negative items (where the drift should show). The markdown tables are
``proof/drift_markdown.py``'s.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bbuqc_lightning.constants import MISSIONS
from proof import drift_data as dd
from proof.drift_inputs import paths
from proof.drift_markdown import STAGE_A_KEYS, markdown
from proof.drift_plan import DRIFTS, STAGES, stage_dir
from proof.drift_plot import draw
from proof.results import METRICS, eval_results, training_summary
from proof.runs import read_json

TARGETS = {"drift_false_pass_min": 0.20, "cure_false_pass_max": 0.05, "cure_false_fail_max": 0.05}
TARGETS |= {"cure_format_valid_min": 0.98, "cure_object_f1_drop_max": 0.01}


def stage_result(s: Mapping[str, Any], seed: int, stage: str) -> dict[str, Any] | None:
    """What one stage of one seed measured, or None before its evaluation ran."""
    run = paths(s)["runs"] / f"s{seed}" / f"eval_{stage_dir(s, seed, stage).name}"
    if not (run / "e2e" / "metrics.json").is_file() or not (run / "stage_b" / "metrics.json").is_file():
        return None
    reference = paths(s)["synthetic"] / "stage_a_test.jsonl"
    e2e_metrics = read_json(run / "e2e" / "metrics.json")
    return {
        "stage_b": eval_results(run / "stage_b", "test"),
        "e2e": eval_results(run / "e2e", "e2e"),
        "stage_a": {
            k.removeprefix("stage_a/"): v for k, v in e2e_metrics.items() if k.startswith("stage_a/")
        },
        "negative_items": {
            "stage_b": dd.false_pass_by_negative_item(run / "stage_b" / "predictions.jsonl", reference),
            "e2e": dd.false_pass_by_negative_item(run / "e2e" / "predictions.jsonl", reference),
        },
        "findings_kept": (
            dd.findings_kept(run / "e2e" / "stage_a.jsonl", reference)
            if (run / "e2e" / "stage_a.jsonl").is_file()
            else None
        ),
        "e2e_floor": (
            dd.end_to_end_floor(run / "e2e" / "predictions.jsonl", run / "e2e" / "stage_a.jsonl", reference)
            if (run / "e2e" / "stage_a.jsonl").is_file()
            else None
        ),
    }


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def aggregate(per_seed: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean / min / max / std over seeds of every rate, per view (stage_b, e2e) and scope (all, slugs)."""
    seeds = [r for r in per_seed.values() if r is not None]
    if not seeds:
        return {}
    out: dict[str, Any] = {}
    for view in ("stage_b", "e2e"):
        for scope in ("all", *MISSIONS.values()):
            for name in METRICS:
                values = [r[view][scope][name] for r in seeds if r[view][scope][name] is not None]
                if values:
                    out[f"{view}/{name}/{scope}"] = _spread(values)
    for name in STAGE_A_KEYS:
        values = [r["stage_a"][name] for r in seeds if name in r["stage_a"]]
        if values:
            out[f"stage_a/{name}"] = _spread(values)
    return out


GRPO_SERIES = ("train/fail_groups_without_fail", "train/fail_groups_rescued", "train/frac_reward_zero_std",
               "train/false_pass_rate", "train/rewards/label/mean")  # fmt: skip


def grpo_training(s: Mapping[str, Any]) -> dict[str, Any]:
    """Per GRPO arm and seed: first / last 10 % means of the blind-group share, rescues and reward signal."""
    out: dict[str, Any] = {}
    for stage in ("cure_b", "cure_b_penalty"):
        for seed in s["seeds"]:
            run = stage_dir(s, seed, stage)
            if (run / "csv" / "metrics.csv").is_file():
                out[f"{stage}/s{seed}"] = training_summary(run, GRPO_SERIES)
    return out


def drifts_tried(s: Mapping[str, Any]) -> dict[str, Any]:
    """Every drift mechanism evaluated in this folder (the cures follow ``s["drift"]`` only)."""
    out = {}
    for mechanism in DRIFTS:
        per_seed = {seed: stage_result({**s, "drift": mechanism}, seed, "drift") for seed in s["seeds"]}
        if any(per_seed.values()):
            out[mechanism] = {"seeds": per_seed, "aggregate": aggregate(per_seed)}
    return out


def collect(s: Mapping[str, Any]) -> dict[str, Any]:
    """Every stage's per-seed results and their aggregate, plus the targets of the issue checked."""
    results: dict[str, Any] = {}
    for stage in STAGES:
        per_seed = {seed: stage_result(s, seed, stage) for seed in s["seeds"]}
        results[stage] = {"seeds": per_seed, "aggregate": aggregate(per_seed)}
    return {
        "results": results,
        "checks": checks(results),
        "grpo_training": grpo_training(s),
        "drifts_tried": drifts_tried(s),
    }


def _mean(results: Mapping[str, Any], stage: str, key: str) -> float | None:
    """The seed mean, rounded to 6 decimals: metrics.json holds float32 rates (10/100 reads 0.10000000149), and
    a mean exactly on a bound must meet it."""
    value = results.get(stage, {}).get("aggregate", {}).get(key)
    return None if value is None else round(value["mean"], 6)


def checks(results: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's "done means", on seed means, for what has been measured (None: not measured yet)."""
    out: dict[str, Any] = {}
    fp = _mean(results, "drift", "stage_b/false_pass_rate/all")
    out["drift_false_pass_at_least_20pct"] = None if fp is None else fp >= TARGETS["drift_false_pass_min"]
    for cure in ("cure_a", "cure_b", "cure_b_penalty"):
        for view in ("stage_b", "e2e"):
            fp = _mean(results, cure, f"{view}/false_pass_rate/all")
            ff = _mean(results, cure, f"{view}/false_fail_rate/all")
            fv = _mean(results, cure, f"{view}/format_valid_rate/all")
            known = None not in (fp, ff, fv)
            out[f"{cure}/{view}"] = (
                None
                if not known
                else (
                    fp <= TARGETS["cure_false_pass_max"]
                    and ff <= TARGETS["cure_false_fail_max"]
                    and fv >= TARGETS["cure_format_valid_min"]
                )
            )
        f1, f1_drift = _paired_f1(results, cure)
        out[f"{cure}/stage_a_f1_kept"] = (
            None if None in (f1, f1_drift) else f1 >= f1_drift - TARGETS["cure_object_f1_drop_max"]
        )
    return out


def _paired_f1(results: Mapping[str, Any], cure: str) -> tuple[float | None, float | None]:
    """Stage-A object F1 of ``cure`` and of the drifted student, each a mean over the seeds *both* measured (a
    cure run on one seed is held against that seed's drifted student, not the mean of two), else the seed means
    (results without per-seed rows)."""

    def per_seed(stage: str) -> dict[Any, float]:
        seeds = results.get(stage, {}).get("seeds", {})
        return {
            k: r["stage_a"]["object_f1"]
            for k, r in seeds.items()
            if r and "object_f1" in r.get("stage_a", {})
        }

    cure_f1, drift_f1 = per_seed(cure), per_seed("drift")
    both = sorted(set(cure_f1) & set(drift_f1), key=str)
    if not both:
        return _mean(results, cure, "stage_a/object_f1"), _mean(results, "drift", "stage_a/object_f1")
    return tuple(round(sum(f[k] for k in both) / len(both), 6) for f in (cure_f1, drift_f1))  # type: ignore[return-value]


def plot(report: Mapping[str, Any], out: Path) -> tuple[Path, str]:
    """One PNG: false-pass rate (Stage-B from references, seed mean) by stage, a bar per mission and overall."""
    results = report["results"]
    series = {
        slug: [_mean(results, stage, f"stage_b/false_pass_rate/{slug}") for stage in STAGES]
        for slug in [*MISSIONS.values(), "all"]
    }
    return draw(STAGES, series, out)


def write_report(s: Mapping[str, Any], done: Mapping[str, Any]) -> dict[str, Any]:
    """Collect, plot and write ``drift_and_cure.json`` / ``.md`` into the output folder."""
    out = paths(s)["out"]
    report = {"settings": dict(s), "steps": dict(done), **collect(s)}
    png, drawn_by = plot(report, out / "false_pass.png")
    report["plot"], report["plot_drawn_by"] = png.name, drawn_by
    (out / "drift_and_cure.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8"
    )
    (out / "drift_and_cure.md").write_text(markdown(report), encoding="utf-8")
    return report


def table_rows(report: Mapping[str, Any]) -> list[list[Any]]:
    """One row per stage, view and scope: the aggregate rates (mean, std, seeds) as a W&B table holds them."""
    rows = []
    for stage in STAGES:
        agg = report["results"][stage]["aggregate"]
        for key, value in sorted(agg.items()):
            rows.append([stage, key, value["mean"], value["std"], value["n"]])
    return rows


def log_to_wandb(report: Mapping[str, Any], out: Path) -> str | None:
    """The results table and the plot as one offline W&B run (``wandb sync`` uploads it); its folder, or None."""
    import os

    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        project="bbuqc_lightning",
        name="drift_and_cure",
        dir=str(out),
        mode="offline",
        tags=["drift_and_cure", "report"],
        config={k: v for k, v in report["settings"].items() if not k.startswith("_")},
    )
    try:
        columns = ["stage", "metric", "mean", "std", "seeds"]
        run.log({"drift_and_cure/results": wandb.Table(columns=columns, data=table_rows(report))})
        if report.get("plot"):
            run.log({"drift_and_cure/false_pass": wandb.Image(str(out / report["plot"]))})
        run.summary.update({f"checks/{k}": v for k, v in report["checks"].items() if v is not None})
        return run.dir
    finally:
        run.finish()
