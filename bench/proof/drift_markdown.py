"""The drift/cure report as markdown: the stage tables (Stage-B from references, end to end, Stage-A, false-pass
per mission), then what the steps fed each other, the findings Stage-A kept, false passes by seed negative item, the
end-to-end floor and the GPU memory the steps reserved. ``proof/drift_report.py`` collects what these tables read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from bbuqc_lightning.constants import MISSIONS
from proof.drift_plan import STAGES, step_kind
from proof.drift_profiles import memory_gb
from proof.results import fmt

STAGE_A_COLUMNS = {
    "object_f1": "Stage-A object F1",
    "exact_match": "exact match",
    "irrelevant_accuracy": "无关图片 accuracy",
    "negative_item_recall": "negative-item recall",
}
STAGE_A_KEYS = tuple(STAGE_A_COLUMNS)


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
