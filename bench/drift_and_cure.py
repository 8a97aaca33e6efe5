"""Drift and cure: reproduce the unified model's drift toward 通过, cure it with Teacher distillation and with
GRPO, and check that Stage-A summaries survive — through the project's own entry points, step by step.

The successor of ``bench/learning_proof.py`` (whose fusion SFT is this pipeline's ``base``). Steps
(``bench/proof/drift_plan.py`` says what each does): ``data``; per seed ``s<k>/base``, ``s<k>/eval_base``,
``s<k>/drift_<mechanism>``, ``s<k>/eval_drift_<mechanism>``; ``teacher`` (unless ``--teacher base``) and
``distill``; per seed ``s<k>/cure_a``, ``s<k>/cure_b``, ``s<k>/cure_b_penalty`` and their ``eval_*``. Every step
is one or more subprocesses (``python -m bbuqc_lightning.train ...``, ``tools/distill.py``, ``tools/export.py``)
whose model folder feeds the steps after it. The steps form a DAG (``proof/dag.py``): ``--jobs N`` runs up to N
ready steps at once as separate processes on the one GPU (default 4 on cuda, 1 on cpu; ``proof/scheduler.py``),
and a failed step stops only its dependants. ``<out>/state.json`` (written by this process alone) records
what is done, so a rerun with the same ``--out`` goes on where the last call stopped (a step cut off mid-way is
rerun from scratch). ``--steps`` picks what to run now (default: everything left), ``--max-minutes`` is the
call's wall-clock budget: a step whose estimate would end past it is not started. ``--gpu-memory-gb`` is the
steps' GPU memory budget (default: the card's memory): a step waits until its measured peak fits beside those
running (``proof/drift_profiles.memory_gb``). ``--bundle DIR`` copies the
report, the step logs and the W&B report run into at most 8 files of at most 16 MiB (``proof/bundle.py``).

Writes to ``--out``: ``drift_and_cure.json`` / ``.md`` (tables per stage, overall and per mission, mean and
spread over seeds, the issue's checks), ``false_pass.png``, ``wandb/`` (an offline run with the results table
and the plot), ``logs/``, ``runs/`` (Hydra run folders with
their offline W&B runs), ``fusion/`` (the mixes), ``distill/`` (Teacher input and the distill file).

Commands::

    python bench/drift_and_cure.py --device cuda --out outputs/drift --plan    # DAG waves, minutes, the calls
    # one H100: the whole proof in one run (~27 min estimated with the memory budget; run 5's smaller base: 22.8 min)
    python bench/drift_and_cure.py --device cuda --out outputs/drift --jobs 4 --max-minutes 32 --bundle BUNDLE_DIR
    # or, where one command may run 10 minutes at most: the same command with --max-minutes 9, 3 times (resumes)
    python bench/drift_and_cure.py --device cuda --out outputs/drift --steps s0/drift_lenient,s0/eval_drift_lenient
    python bench/drift_and_cure.py --device cuda --out outputs/drift --report-only
    # the cures again, longer, from the same drifted students (their evaluations follow)
    python bench/drift_and_cure.py --device cuda --out outputs/drift --rerun s0/cure_b,s1/cure_b,s0/cure_b_penalty,s1/cure_b_penalty --set grpo_steps=240
    python bench/drift_and_cure.py --device cpu --out /tmp/drift_smoke --seeds 0 --teacher base   # CPU smoke

Settings are fixed by the first call (``state.json``); later calls take them from there, except ``--drift``,
which may switch to the other mechanism until a cure has run (both drifts then sit side by side).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proof.bundle import bundle
from proof.dag import describe, with_dependants
from proof.drift_markdown import markdown
from proof.drift_plan import DRIFTS, PlannedStep, build_plan
from proof.drift_profiles import DEFAULT_JOBS, PLAN_MINUTES, PROFILES, with_older_settings
from proof.drift_report import log_to_wandb, write_report
from proof.runs import device_name, gpu_budget, run_step
from proof.scheduler import Outcome, run_dag

STATE = "state.json"
CHOICES = {"teacher": ("train", "base"), "conflict_policy": ("drop", "flip", "mark")}
_PREPARE = threading.Lock()  # steps' input files are written one step at a time


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(PROFILES), required=True)
    parser.add_argument("--out", required=True, help="output folder; rerun with it to continue")
    parser.add_argument("--seeds", help="comma-separated training seeds (default 0,1)")
    parser.add_argument(
        "--drift", choices=DRIFTS, help="drift mechanism (default lenient; see docs/RESULTS.md)"
    )
    parser.add_argument("--teacher", choices=CHOICES["teacher"], help="train a Teacher, or use s<first>/base")
    parser.add_argument("--conflict-policy", choices=CHOICES["conflict_policy"], help="distill conflicts")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a profile value (see bench/proof/drift_profiles.py), repeatable",
    )
    parser.add_argument("--steps", help="comma-separated step names to run now (default: every step left)")
    parser.add_argument(
        "--rerun",
        help="comma-separated done steps to run again with every step after them; on a later call, --set then "
        "changes settings for those steps only (an error names a done step the change would also alter)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="wall-clock budget of this call: do not start a step whose estimate would end past it",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        help="steps run at once as separate processes (default: 4 on cuda, 1 on cpu)",
    )
    parser.add_argument(
        "--gpu-memory-gb",
        type=float,
        help="GPU memory the steps may hold together (default: the card's, less 1.5; 0: no budget); a step waits "
        "until its measured peak fits beside those running",
    )
    parser.add_argument(
        "--bundle",
        metavar="DIR",
        help="also copy the report, logs and W&B report run into DIR (<= 8 files), after every finished step too",
    )
    parser.add_argument("--plan", action="store_true", help="print the steps and their commands, run nothing")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from what is done")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The first call's settings (profile + options), or those of ``state.json`` on a later call."""
    out = Path(args.out)
    state = out / STATE
    if state.is_file():
        saved = with_older_settings(json.loads(state.read_text(encoding="utf-8"))["settings"])
        given = {"seeds": args.seeds, "teacher": args.teacher, "set": args.set or None}
        if args.rerun and args.set:  # new values for the steps run again (checked against the rest in main)
            given["set"] = None
            saved = apply_sets(saved, args.set, saved["device"])
            saved["_given"] = {**saved["_given"], "set": [*(saved["_given"].get("set") or []), *args.set]}
        changed = [k for k, v in given.items() if v is not None and v != saved["_given"].get(k)]
        if changed or saved["device"] != args.device:
            sys.exit(
                f"error: {out} was started with other settings ({', '.join(changed) or 'device'}); "
                "drop those options, pick a new --out, or name the steps to run again under new --set values with "
                "--rerun"
            )
        if args.drift and args.drift != saved["drift"]:
            cured = [name for name in load_done(out) if "/cure_" in name or "/eval_cure_" in name]
            if cured:
                sys.exit(
                    f"error: --drift {args.drift}: cures of the {saved['drift']} drift already ran "
                    f"({', '.join(cured)}); pick a new --out"
                )
            saved["drift"] = args.drift  # another mechanism from the same base models
        return saved
    s = apply_sets(PROFILES[args.device], args.set, args.device)
    s |= {
        "device": args.device,
        "out": str(out.resolve()),
        "data_dir": str((out / "data").resolve()),
        "data_seed": 0,
        "seeds": [int(x) for x in (args.seeds or "0,1").split(",")],
        "drift": args.drift or "lenient",
        "teacher": args.teacher or "train",
        "conflict_policy": args.conflict_policy or "flip",
        "_given": {
            "seeds": args.seeds,
            "drift": args.drift,
            "teacher": args.teacher,
            "set": args.set or None,
        },
    }
    return s


def apply_sets(s: dict[str, Any], items: Sequence[str], device: str) -> dict[str, Any]:
    """``s`` with each ``KEY=VALUE`` of ``--set`` applied, typed as the ``device`` profile's value."""
    s, profile = dict(s), PROFILES[device]
    for item in items:
        key, _, value = item.partition("=")
        if key not in profile:
            sys.exit(f"error: --set {key}: not a profile key ({', '.join(sorted(profile))})")
        s[key] = (
            type(s[key])(value) if not isinstance(s[key], bool) else value.lower() in ("1", "true", "yes")
        )
    return s


def rerun(
    old: dict[str, Any], new: dict[str, Any], steps: Sequence[str], done: dict[str, Any], sets: Sequence[str]
) -> dict[str, Any]:
    """``done`` without ``steps`` and every step after them (they run again); records the rerun in ``new``.

    A done step that is kept must not change: its commands and the settings its prepared input files are
    written from (``PlannedStep.prepared_from``) under ``new`` must equal those under ``old``, else the call
    stops naming it."""
    plan = build_plan(new)
    names = {step.name for step in plan}
    unknown = [n for n in steps if n not in names]
    if unknown:
        sys.exit(f"error: --rerun: unknown step(s) {', '.join(unknown)}")
    drop = with_dependants(plan, steps)

    def what_runs(step: PlannedStep) -> tuple[list[str], dict[str, Any]]:
        return [c.command for c in step.commands], step.prepared_from

    before = {step.name: what_runs(step) for step in build_plan(old)}
    altered = [
        step.name
        for step in plan
        if step.name in done and step.name not in drop and what_runs(step) != before.get(step.name)
    ]
    if altered:
        sys.exit(
            f"error: --set {' '.join(sets)} changes {', '.join(altered)}, done and not rerun; add to --rerun"
        )
    new["reruns"] = [*old.get("reruns", []), {"steps": sorted(drop & set(done)), "set": list(sets)}]
    return {name: record for name, record in done.items() if name not in drop}


def load_done(out: Path) -> dict[str, Any]:
    path = out / STATE
    return json.loads(path.read_text(encoding="utf-8"))["done"] if path.is_file() else {}


def save_state(s: dict[str, Any], done: dict[str, Any]) -> None:
    path = Path(s["out"]) / STATE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": s, "done": done}, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def run_planned(step: PlannedStep, logs: Path) -> dict[str, Any]:
    """Prepare, run every command (a fresh run folder each), collect; returns what the state records."""
    missing = [str(p) for p in step.needs if not p.exists()]
    if missing:
        sys.exit(f"error: step {step.name} needs {', '.join(missing)}: run the step that writes it first")
    record: dict[str, Any] = {"commands": [], "seconds": 0.0}
    start = time.perf_counter()
    if step.prepare is not None:
        with _PREPARE:
            record["prepared"] = step.prepare()
    for command in step.commands:
        for folder in (command.run_dir, _export_target(command)):
            if folder is not None and folder.exists():
                shutil.rmtree(folder)  # a step cut off mid-way starts again from scratch
        # logs/<step>.<command>.log; a fresh Step per attempt (a step may run again in the same call)
        attempt = dataclasses.replace(
            command, name=f"{step.name.replace('/', '_')}.{command.name}", wandb_runs=[]
        )
        run_step(attempt, logs)
        record["commands"].append(attempt.record())
    if step.finish is not None:
        record["collected"] = step.finish()
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def _export_target(command: Any) -> Path | None:
    out = next((a.removeprefix("--out=") for a in command.argv if a.startswith("--out=")), None)
    return Path(out) if out and "export.py" in " ".join(command.argv[:2]) else None


def run_plan(
    s: dict[str, Any],
    plan: list[PlannedStep],
    wanted: list[str],
    done: dict[str, Any],
    *,
    jobs: int,
    max_minutes: float = 0.0,
    gpu_memory_gb: float = 0.0,
    started: float | None = None,
    report: bool = True,
    bundle_dir: Path | None = None,
) -> Outcome:
    """Run the ``wanted`` steps through the scheduler; after each finished step (main thread only) record it
    in ``state.json``, with ``report`` rewrite the report, and with ``bundle_dir`` rewrite the bundle there.
    ``started``: ``time.monotonic()`` of the call's start, for ``max_minutes`` (default: now)."""
    out = Path(s["out"])
    save_state(s, done)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic() if started is None else started
    named = {**s, "device_name": device_name(s["device"])} if report else s

    def finished(name: str, record: dict[str, Any]) -> None:
        done[name] = record
        save_state(s, done)
        if report:
            try:
                write_report(named, done)
            except Exception as err:  # a report problem must not stop the steps still running
                print(f"warning: report not rewritten after {name}: {type(err).__name__}: {err}")
        if bundle_dir is not None:
            try:
                bundle(out, bundle_dir, None)
            except Exception as err:
                print(f"warning: bundle not rewritten after {name}: {type(err).__name__}: {err}")

    return run_dag(
        plan,
        wanted,
        done,
        jobs=jobs,
        max_minutes=max_minutes,
        gpu_memory_gb=gpu_memory_gb,
        elapsed=lambda: (time.monotonic() - t0) / 60,
        execute=lambda step: run_planned(step, out / "logs"),
        on_finish=finished,
    )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def call_command(args: argparse.Namespace, jobs: int, max_minutes: float) -> str:
    """The command of one GPU call of this plan (every call is the same: it resumes from ``state.json``)."""
    steps = f" --steps {args.steps}" if args.steps else ""
    memory = f" --gpu-memory-gb {args.gpu_memory_gb:g}" if args.gpu_memory_gb is not None else ""
    return (
        f"python bench/drift_and_cure.py --device {args.device} --out {args.out} --jobs {jobs} "
        f'--max-minutes {max_minutes:g}{memory}{steps} --bundle "$OUT"'
    )


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    s = settings(args)
    out = Path(s["out"])
    plan = build_plan(s)
    names = [step.name for step in plan]
    done = load_done(out)
    if args.rerun:  # recorded in state.json when the steps start (--plan only shows them)
        if args.report_only:
            sys.exit("error: --rerun runs steps again; --report-only runs none")
        old = (
            with_older_settings(json.loads((out / STATE).read_text(encoding="utf-8"))["settings"])
            if done
            else s
        )
        done = rerun(old, s, args.rerun.split(","), done, args.set)
    jobs = args.jobs or DEFAULT_JOBS[s["device"]]
    if jobs < 1:
        sys.exit("error: --jobs must be at least 1")
    wanted = args.steps.split(",") if args.steps else [n for n in names if n not in done]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        sys.exit(f"error: unknown step(s) {', '.join(unknown)}; steps: {', '.join(names)}")
    runs_steps = args.plan or not args.report_only
    memory = gpu_budget(args.gpu_memory_gb, s["device"], planning=args.plan) if runs_steps else 0.0
    if args.plan:
        for step in plan:
            mark = "done" if step.name in done else f"~{step.minutes:.1f} min"
            print(f"{step.name}  [{mark}]  after: {', '.join(step.after) or '-'}")
            for command in step.commands:
                print("    " + command.command)
        # with --steps, the calls of those steps alone; a named step that needs one left out (and not done) cannot run
        left_out = set(names) - set(wanted) - set(done)
        blocked = sorted((with_dependants(plan, left_out) - left_out) & set(wanted))
        chosen = [step for step in plan if step.name not in left_out and step.name not in blocked]
        if blocked:
            print(f"\nnot run with these --steps (each needs a step left out): {', '.join(blocked)}")
        budget = args.max_minutes or PLAN_MINUTES
        lines = describe(
            chosen,
            done,
            jobs=jobs,
            max_minutes=budget,
            command=call_command(args, jobs, budget),
            gpu_memory_gb=memory,
        )
        print("\n".join(lines))
        return 0
    outcome = None
    if not args.report_only:
        signal.signal(signal.SIGTERM, _interrupt)  # a killed call stops its subprocesses too
        if memory > 0:
            print(f"GPU memory budget of the steps: {memory:.1f} GB (--gpu-memory-gb; 0 turns it off)")
        if jobs > 1:  # each process's CPU thread pool sized to its share of the cores
            os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
        outcome = run_plan(
            s,
            plan,
            wanted,
            done,
            jobs=jobs,
            max_minutes=args.max_minutes,
            gpu_memory_gb=memory,
            started=started,
            bundle_dir=Path(args.bundle) if args.bundle else None,
        )
    report = write_report({**s, "device_name": device_name(s["device"])}, done)
    print(markdown(report))
    wandb_dir = log_to_wandb(report, out)
    print(f"W&B (offline) run of the results table: {wandb_dir}")
    if args.bundle:
        files = bundle(out, Path(args.bundle), wandb_dir)
        print(f"bundle: {len(files)} files in {args.bundle} ({', '.join(f.name for f in files)})")
    left = [n for n in names if n not in done]
    print(f"steps left: {', '.join(left) if left else 'none'}; report: {out / 'drift_and_cure.md'}")
    if outcome is not None and not outcome.ok:
        for name, error in outcome.failed.items():
            print(f"\nFAILED {name}:\n{error}", file=sys.stderr)
        for name, why in outcome.blocked.items():
            print(f"not run: {name} ({why})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
