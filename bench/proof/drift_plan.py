"""The drift/cure pipeline as named, resumable steps (``bench/drift_and_cure.py`` runs them).

Shared steps: ``data`` (the synthetic benchmark), ``teacher`` (a Teacher trained from scratch on correct
verdicts; skipped with ``--teacher base``), ``distill`` (``tools/distill.py`` with the Teacher, the mission
files concatenated into ``distill/distill_chatml.jsonl``). Per seed ``k``, under ``s<k>/``:

- ``base``: fusion SFT from scratch, correct verdicts (the learning proof's model: it reads summaries well);
- ``drift_<mechanism>``: continued fusion SFT of ``base`` under the chosen mechanism (``summary``: summary-heavy data, no
  verdicts; ``lenient``: summary data + verdicts of a lenient source blind to the seed's negative items);
- ``cure_a``: fusion SFT of the drifted model, LoRA on the top K layers, summary data + the distill file as a
  ``dataset: chat`` target (by ratio), then ``tools/export.py`` -> ``cure_a/model``;
- ``cure_b``: GRPO of the drifted model, label + format rewards, then export;
- ``cure_b_penalty``: the same with the false-pass penalty and batch-scaled advantages, then export;
- ``eval_<stage>`` (``eval_drift_<mechanism>``): ``+experiment=eval`` (Stage-B from reference summaries, ``test/*``) and ``+experiment=e2e``
  (own summaries, ``e2e/*`` and ``stage_a/*``) of that stage's model folder.

Each step names the steps whose folders it reads (``after``: the DAG's edges, ``proof/dag.py``), so
``proof/scheduler.py`` runs independent steps at once and a GPU call can run any closed part of what is left. The drift
steps carry their mechanism in their name: a second mechanism can be tried from the same base models
(``--drift summary`` on a later call) as long as no cure has run from the first one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proof import drift_commands as cmd
from proof import drift_data as dd
from proof.drift_inputs import (
    base_fusion,
    base_mix,
    base_summary_draw,
    collect_distill,
    cure_a_mix,
    drift_mix,
    paths,
    summary_entries,
)
from proof.drift_profiles import memory_gb, minutes
from proof.runs import Step

STAGES = ("base", "drift", "cure_a", "cure_b", "cure_b_penalty")
DRIFTS = ("summary", "lenient")


@dataclass
class PlannedStep:
    """One resumable step: optional preparation (input files), commands in order, optional collection."""

    name: str
    commands: list[Step]
    minutes: float
    needs: list[Path] = field(default_factory=list)
    after: list[str] = field(default_factory=list)  # steps whose outputs this one reads (the DAG's edges)
    memory_gb: float = 0.0  # peak GPU memory alone (proof/drift_profiles.memory_gb; the scheduler's budget)
    prepare: Callable[[], dict[str, Any]] | None = None
    finish: Callable[[], dict[str, Any]] | None = None
    # the settings that shape what ``prepare`` and ``finish`` write, which the commands do not show (``--rerun``
    # compares both)
    prepared_from: dict[str, Any] = field(default_factory=dict)


def stage_dir(s: Mapping[str, Any], seed: int, stage: str) -> Path:
    """Run folder of a stage; the drift's names its mechanism (both can live side by side)."""
    name = f"drift_{s['drift']}" if stage == "drift" else stage
    return paths(s)["runs"] / f"s{seed}" / name


def stage_model(s: Mapping[str, Any], seed: int, stage: str) -> Path:
    return stage_dir(s, seed, stage) / "model"


def teacher_folder(s: Mapping[str, Any]) -> Path:
    if s["teacher"] == "base":
        return stage_model(s, s["seeds"][0], "base")
    return paths(s)["runs"] / "teacher" / "model"


def _step(name: str, argv: list[str], run_dir: Path | None) -> Step:
    return Step(name, argv, run_dir)


def shared_steps(s: Mapping[str, Any]) -> list[PlannedStep]:
    p, est = paths(s), minutes(dict(s))
    steps = [PlannedStep("data", [_step("data", cmd.data_argv(s), None)], est["data"])]
    teacher = "teacher" if s["teacher"] == "train" else f"s{s['seeds'][0]}/base"
    if s["teacher"] == "train":
        run = p["runs"] / "teacher"
        argv = cmd.sft_argv(
            s,
            run,
            s["seeds"][0],
            "teacher",
            model=[f"model={s['teacher_model']}"],
            steps=s["teacher_steps"],
            lr=s["base_lr"],
            max_minutes=s["teacher_max_minutes"],
        )
        steps.append(PlannedStep("teacher", [_step("teacher", argv, run)], est["teacher"], after=["data"]))
    run, inputs = p["runs"] / "distill", p["distill"] / "input.jsonl"
    steps.append(
        PlannedStep(
            "distill",
            [_step("distill", cmd.distill_argv(s, run, teacher_folder(s), inputs), run)],
            est["distill"],
            needs=[teacher_folder(s) / "config.json"],
            after=[teacher],
            prepare=lambda: {
                "input": dd.stratified_subset(
                    p["synthetic"] / "stage_a_train.jsonl",
                    s["distill_per_cell"],
                    s["data_seed"],
                    inputs,
                    negative_share=s["distill_negative_share"],
                )
            },
            finish=lambda: collect_distill(s, run, inputs),
            prepared_from={
                k: s[k]
                for k in ("distill_per_cell", "distill_negative_share", "data_seed", "distill_fallback")
            },
        )
    )
    return steps


def seed_steps(s: Mapping[str, Any], seed: int) -> list[PlannedStep]:
    p, model, est = paths(s), s["model"], minutes(dict(s))
    d = {stage: stage_dir(s, seed, stage) for stage in STAGES}
    drifted = cmd.from_folder(model, stage_model(s, seed, "drift"))
    base, drift = f"s{seed}/base", f"s{seed}/drift_{s['drift']}"
    steps = [
        PlannedStep(
            f"s{seed}/base",
            [
                _step(
                    "base",
                    cmd.sft_argv(
                        s,
                        d["base"],
                        seed,
                        "base",
                        model=cmd.base_model_overrides(s),
                        steps=s["base_steps"],
                        lr=s["base_lr"],
                        fusion=base_fusion(s),
                        stage_b_ratio=s["base_stage_b_ratio"],
                        max_minutes=s["base_max_minutes"],
                    ),
                    d["base"],
                )
            ],
            est["base"],
            needs=[p["synthetic"] / "manifest.json"],
            after=["data"],
            prepare=(lambda: base_mix(s)) if base_fusion(s) != "default" else None,
            prepared_from={"summaries": base_summary_draw(s), "verdicts": s["base_verdict_oversample"]},
        ),
        PlannedStep(
            f"s{seed}/drift_{s['drift']}",
            [
                _step(
                    "drift",
                    cmd.sft_argv(
                        s,
                        d["drift"],
                        seed,
                        f"drift_{s['drift']}",
                        model=cmd.from_folder(model, stage_model(s, seed, "base")),
                        steps=s["drift_steps"],
                        lr=s["drift_lr"],
                        fusion=p["mixes"] / f"drift_{s['drift']}.yaml",
                        max_minutes=s["drift_max_minutes"],
                    ),
                    d["drift"],
                )
            ],
            est["drift"],
            needs=[stage_model(s, seed, "base") / "config.json"],
            after=[base],
            prepare=lambda: drift_mix(s),
            prepared_from={
                "summaries": summary_entries(s)[0],
                **({"lenient_ratio": s["lenient_ratio"]} if s["drift"] == "lenient" else {}),
            },
        ),
        PlannedStep(
            f"s{seed}/cure_a",
            [
                _step(
                    "cure_a",
                    cmd.sft_argv(
                        s,
                        d["cure_a"],
                        seed,
                        "cure_a",
                        model=drifted,
                        steps=s["cure_a_steps"],
                        lr=s["cure_a_lr"],
                        fusion=p["mixes"] / "cure_a.yaml",
                        lora_k=s["cure_a_k"],
                        max_minutes=s["cure_a_max_minutes"],
                    ),
                    d["cure_a"],
                ),
                _step(
                    "export",
                    cmd.export_argv(
                        stage_model(s, seed, "drift"), d["cure_a"] / "adapter", d["cure_a"] / "model"
                    ),
                    None,
                ),
            ],
            est["cure_a"],
            needs=[stage_model(s, seed, "drift") / "config.json", p["distill"] / "distill_chatml.jsonl"],
            after=[drift, "distill"],
            prepare=lambda: cure_a_mix(s),
            prepared_from={"cure_a_share": s["cure_a_share"], "summaries": summary_entries(s)[0]},
        ),
    ]
    arms = (("cure_b", 0.0, "group", "grpo"), ("cure_b_penalty", 1.0, "batch", "penalty"))
    for stage, penalty, scale, key in arms:
        lr, beta = s[f"{key}_lr"], s[f"{key}_beta"]  # the penalty arm's own, so --rerun can change it alone
        grpo = cmd.grpo_argv(
            s, d[stage], seed, stage, model=drifted, penalty=penalty, scale=scale, lr=lr, beta=beta
        )
        export = cmd.export_argv(stage_model(s, seed, "drift"), d[stage] / "adapter", d[stage] / "model")
        steps.append(
            PlannedStep(
                f"s{seed}/{stage}",
                [_step(stage, grpo, d[stage]), _step("export", export, None)],
                est[stage],
                needs=[stage_model(s, seed, "drift") / "config.json"],
                after=[drift],
            )
        )
    evals = []
    for stage, trained in zip(STAGES, steps, strict=True):
        folder = cmd.from_folder(model, stage_model(s, seed, stage))
        run = p["runs"] / f"s{seed}" / f"eval_{stage_dir(s, seed, stage).name}"
        evals.append(
            PlannedStep(
                f"s{seed}/eval_{stage_dir(s, seed, stage).name}",
                [
                    _step(
                        "eval",
                        cmd.eval_argv(s, run / "stage_b", seed, folder, f"eval_{stage}"),
                        run / "stage_b",
                    ),
                    _step("e2e", cmd.e2e_argv(s, run / "e2e", seed, folder, f"e2e_{stage}"), run / "e2e"),
                ],
                est["eval"],
                needs=[stage_model(s, seed, stage) / "config.json"],
                after=[trained.name],
            )
        )
    # Order: each stage, then its evaluation (so a call that stops early has numbers for what it trained).
    order = [
        steps[0],
        evals[0],
        steps[1],
        evals[1],
        steps[2],
        evals[2],
        steps[3],
        evals[3],
        steps[4],
        evals[4],
    ]
    return order


def build_plan(s: Mapping[str, Any]) -> list[PlannedStep]:
    """Every step, in order: shared ``data``, then per seed base/drift (+ evals), then Teacher + distill
    (they need the first seed's base when ``teacher=base``), then the cures per seed."""
    shared = {step.name: step for step in shared_steps(s)}
    per_seed = {seed: seed_steps(s, seed) for seed in s["seeds"]}
    plan = [shared["data"]]
    for seed in s["seeds"]:
        plan += per_seed[seed][:4]  # base, eval_base, drift, eval_drift
    plan += [shared[name] for name in ("teacher", "distill") if name in shared]
    for seed in s["seeds"]:
        plan += per_seed[seed][4:]
    memory = memory_gb(dict(s))
    for step in plan:
        step.memory_gb = memory[step_kind(step.name)]
    return plan


def step_kind(name: str) -> str:
    """The profile's key of a step: ``s0/drift_lenient`` -> ``drift``, ``s1/eval_cure_a`` -> ``eval``."""
    kind = name.rpartition("/")[2]
    return "eval" if kind.startswith("eval_") else "drift" if kind.startswith("drift_") else kind
