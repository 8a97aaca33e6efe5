"""Results of the drift/cure pipeline: per stage and seed, then mean and spread over seeds, as JSON, markdown
and one plot (false-pass rate by stage and mission).

Per stage (``base``, ``drift``, ``cure_a``, ``cure_b``, ``cure_b_penalty``) and seed, from the stage's eval
folders: Stage-B from reference summaries (``test/*`` of ``+experiment=eval``), end to end (``e2e/*`` of
``+experiment=e2e``), Stage-A object F1 / exact match of the model's own summaries (``stage_a/*`` of the
same e2e run) with the findings its summaries kept, photo by photo (``stage_a.jsonl`` against the references),
and false passes split by the seed's negative items (where the drift should show).
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bbuqc_lightning.constants import MISSIONS
from proof import drift_data as dd
from proof.drift_plan import DRIFTS, STAGES, paths, stage_dir, step_kind
from proof.drift_plot import draw
from proof.drift_profiles import memory_gb
from proof.results import METRICS, eval_results, fmt, training_summary
from proof.runs import read_json

STAGE_A_COLUMNS = {
    "object_f1": "Stage-A object F1",
    "exact_match": "exact match",
    "irrelevant_accuracy": "无关图片 accuracy",
    "negative_item_recall": "negative-item recall",
}
STAGE_A_KEYS = tuple(STAGE_A_COLUMNS)
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


def _cell(agg: Mapping[str, Any], key: str) -> str:
    value = agg.get(key)
    if value is None:
        return "—"
    if value["n"] == 1:
        return fmt(value["mean"])
    return f"{value['mean']:.3f} ± {value['std']:.3f}"


def markdown(report: Mapping[str, Any]) -> str:
    """Tables: overall per stage (Stage-B from references, end to end, Stage-A); false-pass per mission."""
    s, results = report["settings"], report["results"]
    lines = [
        f"# Drift and cure ({s['device']}, model={s['model']}, drift={s['drift']}, seeds={s['seeds']})",
        "",
        "Mean ± std over seeds. Stage-B = verdicts from the reference summaries of the held-out split; "
        "e2e = verdicts from the model's own summaries of the held-out photos; Stage-A = those summaries "
        "against the references.",
        "",
        *[
            f"Rerun with `--set {' '.join(r['set'])}`: {', '.join(r['steps'])}.\n"
            for r in s.get("reruns", [])
        ],
        "| stage | view | false-pass | false-fail | accuracy | format-valid |",
        "|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        agg = results[stage]["aggregate"]
        for view in ("stage_b", "e2e"):
            cells = [
                _cell(agg, f"{view}/{m}/all")
                for m in ("false_pass_rate", "false_fail_rate", "accuracy", "format_valid_rate")
            ]
            lines.append(f"| {stage} | {view} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| stage | " + " | ".join(STAGE_A_COLUMNS.values()) + " |",
        "|---" * (len(STAGE_A_KEYS) + 1) + "|",
    ]
    for stage in STAGES:
        agg = results[stage]["aggregate"]
        lines.append(f"| {stage} | " + " | ".join(_cell(agg, f"stage_a/{k}") for k in STAGE_A_KEYS) + " |")
    slugs = list(MISSIONS.values())
    lines += ["", "False-pass rate per mission (Stage-B from references / e2e):", ""]
    lines += ["| stage | " + " | ".join(slugs) + " |", "|---" * (len(slugs) + 1) + "|"]
    for stage in STAGES:
        agg = results[stage]["aggregate"]
        cells = [
            f"{_cell(agg, f'stage_b/false_pass_rate/{m}')} / {_cell(agg, f'e2e/false_pass_rate/{m}')}"
            for m in slugs
        ]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += _findings_lines(results)
    lines += _negative_item_lines(results)
    lines += _floor_lines(results)
    lines += _data_lines(report)
    lines += _memory_lines(report)
    lines += [
        "",
        "Checks (on seed means; Stage-A kept: on the seeds both stages ran; — not measured yet):",
        "",
    ]
    lines += [f"- `{k}`: {'—' if v is None else ('yes' if v else 'no')}" for k, v in report["checks"].items()]
    if report.get("plot"):
        lines += [
            "",
            f"![false-pass by stage and mission]({report['plot']}) (drawn with {report['plot_drawn_by']})",
        ]
    return "\n".join(lines) + "\n"


def _memory_lines(report: Mapping[str, Any]) -> list[str]:
    """Per step kind, the peak GPU memory its processes reserved (their metrics.json, min-max over the steps that
    ran), beside the scheduler's table (:func:`proof.drift_profiles.memory_gb`). The table holds ``nvidia-smi``'s
    view, which adds each process's CUDA context (~0.5 GiB): a measured peak replaces an entry only with that
    added."""
    table = memory_gb(report["settings"])
    peaks: dict[str, list[float]] = {}
    for name, record in report["steps"].items():
        measured = [c["gpu_reserved_gb"] for c in record.get("commands", []) if c.get("gpu_reserved_gb")]
        if measured:
            peaks.setdefault(step_kind(name), []).append(max(measured))
    if not peaks:
        return []
    cells = []
    for kind, values in peaks.items():
        low, high = f"{min(values):.1f}", f"{max(values):.1f}"
        cells.append(f"{kind} {low}" + (f"-{high}" if high != low else "") + f" [{table.get(kind, 0):.1f}]")
    return [
        "",
        "GPU memory reserved at peak per step kind (GiB, each process's own; min-max over its steps; the "
        "scheduler's table in brackets): " + ", ".join(cells),
    ]


def _negative_item_lines(results: Mapping[str, Any]) -> list[str]:
    """False passes per seed negative item (and on fail tickets with none: ``other``), Stage-B from reference
    summaries beside end to end: ``a · b of n`` (the same fail tickets, so one denominator)."""
    rows = [(stage, seed, r["negative_items"]) for stage in STAGES
            for seed, r in results[stage]["seeds"].items() if r is not None]  # fmt: skip
    if not rows:
        return []
    columns = list(dict.fromkeys(key for _, _, split in rows for key in split["stage_b"]))
    lines = [
        "",
        "False passes on fail tickets by seed negative item (Stage-B · end to end of n, per seed):",
        "",
    ]
    lines += ["| stage | seed | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for stage, seed, split in rows:
        cells = []
        for key in columns:
            ref, own = split["stage_b"].get(key), (split.get("e2e") or {}).get(key)
            if ref is None:
                cells.append("—")
                continue
            passed, n = str(ref["n"]).split("/")
            cells.append(f"{passed} · {str(own['n']).split('/')[0]} of {n}" if own else f"{passed} of {n}")
        lines.append(f"| {stage} | {seed} | " + " | ".join(cells) + " |")
    return lines


def _floor_lines(results: Mapping[str, Any]) -> list[str]:
    """End to end, per seed: the fail tickets whose own summaries the SPEC §2 rules pass (the floor no Stage-B can go
    under), and the false passes split into those (Stage-A's) and the rest (Stage-B's)."""
    rows = [(stage, seed, r["e2e_floor"]) for stage in STAGES
            for seed, r in results[stage]["seeds"].items() if r is not None and r.get("e2e_floor")]  # fmt: skip
    if not rows:
        return []
    lines = [
        "",
        "End to end, the rules (SPEC §2) on the model's own summaries of the fail tickets (per seed): the floor is "
        "the share they pass, which no Stage-B can fail from those summaries:",
        "",
        "| stage | seed | floor: rules pass | own summaries unparsed | false passes | of them rules pass (Stage-A's) "
        "| rules fail (Stage-B's) |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage, seed, f in rows:
        n = f["fail"]
        lines.append(
            f"| {stage} | {seed} | {f['rule_pass']} of {n} | {f['unparsed']} | {f['false_pass']} of {n} "
            f"| {f['false_pass_rule_pass']} | {f['false_pass_rule_fail']} |"
        )
    lost: dict[str, Counter] = {}
    for stage, _, f in rows:
        lost.setdefault(stage, Counter()).update(f.get("lost") or {})
    if any(lost.values()):
        lines += [
            "",
            "What the floor's tickets fail for (the rules on their reference summaries; seeds summed):",
            "",
        ]
        lines += [
            f"- {stage}: " + ", ".join(f"{k} {v}" for k, v in c.most_common())
            for stage, c in lost.items()
            if c
        ]
    return lines


def _findings_lines(results: Mapping[str, Any]) -> list[str]:
    """Stage-A: per finding, the held-out photos that show it whose own summary names it, and (+n) the photos
    whose own summary names it where the reference does not (seeds summed; reports before that count show none)."""
    kept = {}
    for stage in STAGES:
        seeds = [r["findings_kept"] for r in results[stage]["seeds"].values() if r and r.get("findings_kept")]
        if seeds:
            kept[stage] = {
                name: [sum(c[name].get(k, 0) for c in seeds) for k in ("kept", "photos", "unfounded")]
                for name in seeds[0]
            }
    if not kept:
        return []
    names = list(next(iter(kept.values())))
    counted = any(
        "unfounded" in c for stage in STAGES for r in results[stage]["seeds"].values() if r and r.get("findings_kept")
        for c in r["findings_kept"].values()
    )  # fmt: skip
    unfounded = "; + photos named where the reference does not" if counted else ""
    lines = [
        "",
        f"Findings the model's own summaries kept (held-out photos that show it{unfounded}; seeds summed):",
        "",
    ]
    lines += [
        "| stage | " + " | ".join(n.replace("|", " / ") for n in names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for stage, counts in kept.items():
        cells = (f"{k}/{n}" + (f" +{u}" if u else "") for k, n, u in counts.values())
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return lines


def _data_lines(report: Mapping[str, Any]) -> list[str]:
    """The drift's lenient verdicts, the distill file (size, agreement with the labels) and GRPO's blind groups."""
    steps, lines = report["steps"], ["", "What the steps fed each other:", ""]
    for name, step in steps.items():
        lenient = (step.get("prepared") or {}).get("lenient")
        if lenient:
            lines.append(f"- `{name}`: lenient source passed {lenient['total_passed']} of {lenient['fail_rows']} "
                         f"fail tickets of the train split ({lenient['passed_by_lenient']})")  # fmt: skip
    for mechanism, tried in report.get("drifts_tried", {}).items():
        agg = tried["aggregate"]
        lines.append(f"- drift `{mechanism}`: false-pass {_cell(agg, 'stage_b/false_pass_rate/all')} (Stage-B), "
                     f"{_cell(agg, 'e2e/false_pass_rate/all')} (e2e); format-valid {_cell(agg, 'stage_b/format_valid_rate/all')}; "
                     f"Stage-A object F1 {_cell(agg, 'stage_a/object_f1')}")  # fmt: skip
    distill = (steps.get("distill") or {}).get("collected")
    if distill:
        agree = {
            k: None if distill[k] is None else round(distill[k], 3)
            for k in ("teacher_agreement", "label_agreement")
        }
        lines.append(f"- `distill`: {distill['rows']} rows, {distill['bytes']} bytes; Teacher verdict = label {agree['teacher_agreement']}, "
                     f"taught verdict = label {agree['label_agreement']}; conflicts {distill['conflicts']}, flipped "
                     f"{distill['flipped']}; guidance experiences {distill.get('guidance_experiences')}"
                     + ("; **smoke stand-in: reference answers**" if distill.get("smoke_fallback") else ""))  # fmt: skip
    for arm, series in report.get("grpo_training", {}).items():
        blind, rescued = series["train/fail_groups_without_fail"], series["train/fail_groups_rescued"]
        if blind["n"]:
            lines.append(f"- `{arm}`: fail tickets whose samples never said 不通过 {fmt(blind['first'])} -> "
                         f"{fmt(blind['last'])} of the batch's fail tickets (first / last 10 % of {blind['n']} steps); "
                         f"answers rescued per step {fmt(rescued['first'])} -> {fmt(rescued['last'])}")  # fmt: skip
    return lines if len(lines) > 3 else []


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
