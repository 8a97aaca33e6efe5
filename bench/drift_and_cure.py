"""Drift and cure: reproduce the unified model's drift toward 通过, cure it with Teacher distillation and with
GRPO, and check that Stage-A summaries survive — through the project's own entry points, step by step.

The successor of ``bench/learning_proof.py`` (whose fusion SFT is this pipeline's ``base``). Steps
(``bench/proof/drift_plan.py`` says what each does): ``data``; per seed ``s<k>/base``, ``s<k>/eval_base``,
``s<k>/drift_<mechanism>``, ``s<k>/eval_drift_<mechanism>``; ``teacher`` (unless ``--teacher base``) and ``distill``; per seed
``s<k>/cure_a``, ``s<k>/cure_b``, ``s<k>/cure_b_penalty`` and their ``eval_*``. Every step is one or more
subprocesses (``python -m bbuqc_lightning.train ...``, ``tools/distill.py``, ``tools/export.py``) whose model
folder feeds the next step; ``<out>/state.json`` records what is done, so a rerun with the same ``--out``
goes on where the last call stopped (a step cut off mid-way is rerun from scratch). ``--steps`` picks what
to run now (default: everything left), ``--max-minutes`` stops before a step whose estimate would not fit.

Writes to ``--out``: ``drift_and_cure.json`` / ``.md`` (tables per stage, overall and per mission, mean and
spread over seeds, the issue's checks), ``false_pass.png``, ``wandb/`` (an offline run with the results table
and the plot), ``logs/``, ``runs/`` (Hydra run folders with
their offline W&B runs), ``fusion/`` (the mixes), ``distill/`` (Teacher input and the distill file).

Commands::

    python bench/drift_and_cure.py --device cuda --out outputs/drift --plan            # steps + minutes
    python bench/drift_and_cure.py --device cuda --out outputs/drift --max-minutes 9   # repeat until done
    python bench/drift_and_cure.py --device cuda --out outputs/drift --steps s0/drift,s0/eval_drift
    python bench/drift_and_cure.py --device cuda --out outputs/drift --report-only
    python bench/drift_and_cure.py --device cpu --out /tmp/drift_smoke --seeds 0 --teacher base   # CPU smoke

Settings are fixed by the first call (``state.json``); later calls take them from there, except ``--drift``,
which may switch to the other mechanism until a cure has run (both drifts then sit side by side).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proof.drift_plan import DRIFTS, PlannedStep, build_plan
from proof.drift_profiles import PROFILES
from proof.drift_report import log_to_wandb, markdown, write_report
from proof.runs import device_name, run_step

STATE = "state.json"
CHOICES = {"teacher": ("train", "base"), "conflict_policy": ("drop", "flip", "mark")}


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
        "--max-minutes", type=float, default=0.0, help="stop before a step that would not fit"
    )
    parser.add_argument("--plan", action="store_true", help="print the steps and their commands, run nothing")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from what is done")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The first call's settings (profile + options), or those of ``state.json`` on a later call."""
    out = Path(args.out)
    state = out / STATE
    if state.is_file():
        saved = json.loads(state.read_text(encoding="utf-8"))["settings"]
        given = {"seeds": args.seeds, "teacher": args.teacher, "set": args.set or None}
        changed = [k for k, v in given.items() if v is not None and v != saved["_given"].get(k)]
        if changed or saved["device"] != args.device:
            sys.exit(
                f"error: {out} was started with other settings ({', '.join(changed) or 'device'}); "
                "drop those options or pick a new --out"
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
    s: dict[str, Any] = dict(PROFILES[args.device])
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in s:
            sys.exit(f"error: --set {key}: not a profile key ({', '.join(sorted(s))})")
        s[key] = (
            type(s[key])(value) if not isinstance(s[key], bool) else value.lower() in ("1", "true", "yes")
        )
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
        record["prepared"] = step.prepare()
    for command in step.commands:
        for folder in (command.run_dir, _export_target(command)):
            if folder is not None and folder.exists():
                shutil.rmtree(folder)  # a step cut off mid-way starts again from scratch
        command.name = f"{step.name.replace('/', '_')}.{command.name}"  # logs/<step>.<command>.log
        run_step(command, logs)
        record["commands"].append(command.record())
    if step.finish is not None:
        record["collected"] = step.finish()
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def _export_target(command: Any) -> Path | None:
    out = next((a.removeprefix("--out=") for a in command.argv if a.startswith("--out=")), None)
    return Path(out) if out and "export.py" in " ".join(command.argv[:2]) else None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings(args)
    out = Path(s["out"])
    plan = build_plan(s)
    names = [step.name for step in plan]
    done = load_done(out)
    wanted = args.steps.split(",") if args.steps else [n for n in names if n not in done]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        sys.exit(f"error: unknown step(s) {', '.join(unknown)}; steps: {', '.join(names)}")
    if args.plan:
        for step in plan:
            mark = "done" if step.name in done else f"~{step.minutes:.1f} min"
            print(f"{step.name}  [{mark}]")
            for command in step.commands:
                print("    " + command.command)
        return 0
    if not args.report_only:
        save_state(s, done)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        spent = 0.0
        for step in (st for st in plan if st.name in wanted):
            if args.max_minutes and spent + step.minutes > args.max_minutes:
                print(f"stopping before {step.name}: ~{step.minutes:.1f} min would pass --max-minutes")
                break
            print(f"[{time.strftime('%H:%M:%S')}] step {step.name}", flush=True)
            done[step.name] = run_planned(step, out / "logs")
            spent += done[step.name]["seconds"] / 60
            save_state(s, done)
            write_report({**s, "device_name": device_name(s["device"])}, done)
    report = write_report({**s, "device_name": device_name(s["device"])}, done)
    print(markdown(report))
    print(f"W&B (offline) run of the results table: {log_to_wandb(report, out)}")
    left = [n for n in names if n not in done]
    print(f"steps left: {', '.join(left) if left else 'none'}; report: {out / 'drift_and_cure.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
