"""The learning proof's claim check and report (``learning_proof.json`` / ``learning_proof.md``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bbuqc_lightning.constants import MISSIONS
from proof.results import METRICS, fmt

CLAIM_MAX_FALSE_FAIL = 0.05
SFT_SERIES = (
    "train/loss",
    "train/loss/stage_b_distill",
    "train/loss/bbu_summary",
    "val/loss/stage_b_distill",
)
GRPO_SERIES = (
    "train/loss",
    "train/reward",
    "train/rewards/label/mean",
    "train/rewards/format/mean",
    "train/frac_reward_zero_std",
    "train/false_pass_rate",
    "train/false_fail_rate",
    "train/completion_length/mean",
    "train/kl",
    "train/step_seconds",
    "train/generation_seconds",
    "val/accuracy",
    "val/false_pass_rate",
)


def claim_check(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """GRPO lowers the overall false-pass rate, with a false-fail rate of at most 5 %."""
    sft, grpo = results["sft"]["all"], results["grpo"]["all"]
    fp_sft, fp_grpo, ff_grpo = sft["false_pass_rate"], grpo["false_pass_rate"], grpo["false_fail_rate"]
    known = None not in (fp_sft, fp_grpo, ff_grpo)
    lowered = known and fp_grpo < fp_sft
    within = known and ff_grpo <= CLAIM_MAX_FALSE_FAIL
    fv_sft, fv_grpo = sft["format_valid_rate"], grpo["format_valid_rate"]
    caveat = None
    if None not in (fv_sft, fv_grpo) and fv_grpo < fv_sft:
        # An invalid answer is neither a false pass nor a false fail: fewer valid answers can lower both.
        caveat = f"format-valid rate fell from {fv_sft:.3f} to {fv_grpo:.3f}; invalid answers count in neither rate"
    return {
        "false_pass_rate_sft": fp_sft,
        "false_pass_rate_grpo": fp_grpo,
        "false_fail_rate_grpo": ff_grpo,
        "false_pass_lowered": lowered,
        "false_fail_at_most_5pct": within,
        "holds": bool(lowered and within),
        "format_valid_rate_sft": fv_sft,
        "format_valid_rate_grpo": fv_grpo,
        "caveat": caveat,
    }


def markdown(report: Mapping[str, Any]) -> str:
    settings = report["settings"]
    lines = [
        f"# Learning proof ({settings['device']}, model={settings['model']})",
        "",
        f"Started {report['started']}; total wall time {report['total_seconds']:.0f} s.",
        "",
        "## Held-out test split",
        "",
        "| mission | after | format-valid | accuracy | false-pass | false-fail |",
        "|---|---|---|---|---|---|",
    ]
    results = report.get("results", {})
    for scope in ("all", *MISSIONS.values()):
        for stage in ("sft", "grpo"):
            if stage not in results:
                continue
            row = results[stage][scope]
            cells = [f"{fmt(row[m])} ({row[f'{m}_n']})" for m in METRICS]
            lines.append(f"| {scope} | {stage.upper()} | " + " | ".join(cells) + " |")
    if "claim" in report:
        claim = report["claim"]
        verdict = "holds" if claim["holds"] else "does not hold"
        lines += [
            "",
            f"Claim (GRPO lowers the false-pass rate at a false-fail rate <= 5 %): **{verdict}** — false-pass "
            f"{fmt(claim['false_pass_rate_sft'])} -> {fmt(claim['false_pass_rate_grpo'])}, false-fail after "
            f"GRPO {fmt(claim['false_fail_rate_grpo'])}; format-valid {fmt(claim['format_valid_rate_sft'])} -> "
            f"{fmt(claim['format_valid_rate_grpo'])}."
            + (f" Caveat: {claim['caveat']}." if claim["caveat"] else ""),
        ]
    wanted = {"sft": settings["sft_steps"], "grpo": settings["grpo_steps"]}
    for run, steps in wanted.items():
        done = report.get("training", {}).get(run, {}).get("train/loss", {}).get("n", steps)
        if done < steps:
            lines += ["", f"**{run.upper()} trained {done} of {steps} steps** (stopped by its time cap)."]
    lines += ["", "## Training (mean of the first / last 10 % of logged steps)", ""]
    lines += ["| run | metric | first | last | logged |", "|---|---|---|---|---|"]
    for run in ("sft", "grpo"):
        for key, value in report.get("training", {}).get(run, {}).items():
            if value["n"]:
                lines.append(
                    f"| {run} | `{key}` | {fmt(value['first'])} | {fmt(value['last'])} | {value['n']} |"
                )
    data = report.get("data", {})
    if data:
        splits = ", ".join(f"{s} {v['groups']} tickets" for s, v in data["splits"].items())
        lines += [
            "",
            f"Data: {splits}; test tickets identical to a train ticket: "
            f"{data['test_tickets_seen_in_train']}.",
        ]
    lines += ["", "## Commands", "", "```bash"]
    lines += [step["command"] for step in report["steps"]]
    lines += [
        "```",
        "",
        "## Run folders",
        "",
        "| step | seconds | run folder | W&B run |",
        "|---|---|---|---|",
    ]
    for step in report["steps"]:
        wandb_runs = ", ".join(step["wandb_runs"]) or "—"
        name = step["name"] + (" (reused)" if step.get("reused") else "")
        lines.append(f"| {name} | {step['seconds']:.0f} | {step['run_dir'] or '—'} | {wandb_runs} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: Mapping[str, Any]) -> None:
    (out / "learning_proof.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "learning_proof.md").write_text(markdown(report), encoding="utf-8")
