"""What the drift/cure steps prepare before their commands run: the output layout (:func:`paths`), the fusion files
of the base, the drift and cure A (their summary draw, the lenient verdicts, the distill file's share), and the
distill file collected from the Teacher's rollout. ``proof/drift_plan.py`` names the steps that call these.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from proof import drift_data as dd
from proof.runs import REPO


def paths(s: Mapping[str, Any]) -> dict[str, Path]:
    out = Path(s["out"])
    synthetic = Path(s["data_dir"]) / "synthetic"
    return {
        "out": out,
        "runs": out / "runs",
        "synthetic": synthetic,
        "fusion_data": synthetic / "fusion",
        "mixes": out / "fusion",
        "distill": out / "distill",
    }


def rare_summary_rules(s: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The base's rules for the summaries drawn above the other findings, first match first."""
    rules = [
        (dd.BEND_FINDING_PATTERN, s["base_bend_finding_oversample"]),
        (dd.RARE_FINDING_PATTERN, s["base_rare_finding_oversample"]),
    ]
    return [(pattern, weight) for pattern, weight in rules if weight]


def summary_entries(s: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The drift's and cure A's summary and dense targets; the summaries drawn as the base draws them when
    ``summary_mix_as_base`` (from run 9: a later fusion step changes the verdicts it teaches, not the summary
    target itself)."""
    fusion = paths(s)["fusion_data"]
    summary = {
        "name": "bbu_summary",
        "dataset": "bbu",
        "train_jsonl": str(fusion / "bbu_train.jsonl"),
        "val_jsonl": str(fusion / "bbu_val.jsonl"),
        "template": "summary_bbu",
        "mode": "summary",
        "ratio": 1.0,
    }
    if s["summary_mix_as_base"] and (draw := base_summary_draw(s)) is not None:
        summary["answer_oversample"] = draw
    dense = {
        "name": "bbu_dense",
        "dataset": "bbu",
        "train_jsonl": str(fusion / "bbu_train.jsonl"),
        "template": "target_dense_bbu",
        "mode": "dense",
        "ratio": 0.1,
    }
    return summary, dense


def base_summary_draw(s: Mapping[str, Any]) -> Any:
    """The ``answer_oversample`` of the base's summary target, or None where it draws every summary alike."""
    if s["base_finding_oversample"] == 1.0 and not rare_summary_rules(s):
        return None
    return dd.finding_oversample(s["base_finding_oversample"], rare_summary_rules(s))


def base_fusion(s: Mapping[str, Any]) -> str | Path:
    """The base's fusion file: the embedded mix, or ``<out>/fusion/base_findings.yaml`` when findings (or rare
    verdicts) are oversampled."""
    if base_summary_draw(s) is None and s["base_verdict_oversample"] == 1.0:
        return "default"
    return paths(s)["mixes"] / "base_findings.yaml"


def base_mix(s: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``<out>/fusion/base_findings.yaml``: the embedded mix with its summary target's findings and its
    Stage-B target's rare verdicts oversampled."""
    return dd.finding_oversampled_mix(
        Path(base_fusion(s)),
        REPO / "conf" / "fusion" / "default.yaml",
        s["base_finding_oversample"],
        s["base_verdict_oversample"],
        rare_summary_rules(s),
    )


def drift_mix(s: Mapping[str, Any]) -> dict[str, Any]:
    """Write the drift step's fusion file (and, for ``lenient``, the lenient verdict file)."""
    p = paths(s)
    summary, dense = summary_entries(s)
    stats: dict[str, Any] = {"mechanism": s["drift"]}
    targets = [summary]
    if s["drift"] == "lenient":
        lenient = p["mixes"] / "stage_b_lenient.jsonl"
        stats["lenient"] = dd.write_lenient_stage_b(
            p["fusion_data"] / "stage_b_train.jsonl",
            p["synthetic"] / "stage_a_train.jsonl",
            lenient,
            dd.pass_answer(REPO),
        )
        targets.append(
            {
                "name": "stage_b_lenient",
                "dataset": "chat",
                "train_jsonl": str(lenient),
                "val_jsonl": str(p["fusion_data"] / "stage_b_val.jsonl"),
                "template": "chatml",
                "ratio": s["lenient_ratio"],
            }
        )
    stats["fusion"] = str(dd.fusion_file(p["mixes"] / f"drift_{s['drift']}.yaml", targets, [dense]))
    return stats


def cure_a_mix(s: Mapping[str, Any]) -> dict[str, Any]:
    """Summary target + the distill file as a chat target sized to ``cure_a_share`` of the targets' rows."""
    p = paths(s)
    summary, dense = summary_entries(s)
    distill = p["distill"] / "distill_chatml.jsonl"
    n_distill = len(dd.read_jsonl(distill))
    if not n_distill:
        raise RuntimeError(
            f"{distill} is empty: the Teacher gave no valid answer (see the distill run's log)"
        )
    n_summary = len(dd.read_jsonl(Path(summary["train_jsonl"])))
    share = s["cure_a_share"]
    ratio = round(share / (1 - share) * n_summary / n_distill, 4)
    target = {
        "name": "stage_b_distill",
        "dataset": "chat",
        "train_jsonl": str(distill),
        "val_jsonl": str(p["fusion_data"] / "stage_b_val.jsonl"),
        "template": "chatml",
        "ratio": ratio,
        "fail_oversample": 2.0,
    }
    fusion = dd.fusion_file(p["mixes"] / "cure_a.yaml", [summary, target], [dense])
    return {"fusion": str(fusion), "distill_rows": n_distill, "distill_ratio": ratio}


def collect_distill(s: Mapping[str, Any], run: Path, inputs: Path) -> dict[str, Any]:
    """The mission files as one ``distill/distill_chatml.jsonl`` with its size and label agreement; an empty
    result is replaced by the reference answers only where the profile allows it (the CPU smoke run)."""
    p = paths(s)
    out = p["distill"] / "distill_chatml.jsonl"
    stats = dd.collect_distill(run / "stage_b", out)
    if not stats["rows"] and s["distill_fallback"]:
        stats["smoke_fallback"] = dd.reference_distill(p["fusion_data"] / "stage_b_train.jsonl", inputs, out)
    return stats
