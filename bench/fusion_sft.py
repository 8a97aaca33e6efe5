"""Fusion SFT with and without ``data.group_by_length``, side by side: seconds a step, rows and real tokens a second,
the batches' padding and peak GPU memory.

The workload is the drift/cure pipeline's base (``bench/drift_and_cure.py``, step ``s0/base``): its model, its mix
(``<out>/fusion/base_findings.yaml``, photo summaries and Stage-B verdicts of 1-20+ photo tickets), its batch of
64 and its data workers; only the step count is this script's, and validation is off. Each arm is one process
(``python -m bbuqc_lightning.train ...``, the same command but ``data.group_by_length``), one after the other, timed by
``proof/step_timer.py`` (each step between its batch's start and end, the GPU synchronised; the first
``--warmup`` steps left out of the rates). Both arms draw the same rows per epoch, in another order.

Commands::

    python bench/fusion_sft.py --device cuda --out outputs/fusion_sft_bench --steps 200
    python bench/fusion_sft.py --device cpu --out /tmp/fusion_sft_smoke --steps 3   # CPU smoke (tiny model)

Writes ``<out>/fusion_sft.json`` (both arms, the ratios) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import drift_and_cure as pipeline
from proof.drift_plan import build_plan
from proof.drift_profiles import PROFILES
from proof.runs import Step, device_name, run_step

ARMS = {"shuffled": False, "grouped": True}
BENCH = Path(__file__).resolve().parent


def settings(device: str, out: Path, steps: int) -> dict[str, Any]:
    """The drift pipeline's settings for ``device`` (as ``bench/drift_and_cure.py`` makes them), one seed, its base
    cut to ``steps`` steps."""
    args = ["--device", device, "--out", str(out), "--seeds", "0", "--teacher", "base"]
    return pipeline.settings(
        pipeline.parse_args([*args, "--set", f"base_steps={steps}", "--set", "base_max_minutes=0"])
    )


def arm_argv(base: list[str], run_dir: Path, grouped: bool, timer: Path, warmup: int) -> list[str]:
    """The base's command with its own run folder, ``data.group_by_length``, no validation and the step timer."""
    argv = [f"hydra.run.dir={run_dir}" if a.startswith("hydra.run.dir=") else a for a in base]
    argv = [a for a in argv if not a.startswith("trainer.limit_val_batches=")]
    return [
        *argv,
        f"data.group_by_length={str(grouped).lower()}",
        "trainer.limit_val_batches=0",
        f"+callbacks.step_timer={{_target_:proof.step_timer.StepTimer,out:'{timer}',warmup:{warmup}}}",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(PROFILES), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the rates")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    args = parser.parse_args(argv)
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    s = settings(args.device, out, args.steps)
    plan = {step.name: step for step in build_plan(s)}
    if not (Path(s["data_dir"]) / "synthetic" / "stage_a_train.jsonl").is_file():
        for command in plan["data"].commands:
            run_step(command, logs)
    base = plan["s0/base"]
    if base.prepare is not None:
        base.prepare()
    # the step timer's module (bench/proof) must import in each arm's process
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH", "")) if p)
    results: dict[str, Any] = {}
    for arm in args.arms.split(","):
        if arm not in ARMS:
            sys.exit(f"error: --arms: unknown arm {arm!r} ({', '.join(ARMS)})")
        run_dir, timer = out / "runs" / arm, out / "runs" / arm / "step_timer.json"
        step = Step(arm, arm_argv(base.commands[0].argv, run_dir, ARMS[arm], timer, args.warmup), run_dir)
        run_step(step, logs)
        results[arm] = {**json.loads(timer.read_text(encoding="utf-8")), "process_s": round(step.seconds, 1)}
    report = {
        "device": device_name(args.device),
        "command": " ".join(["python", "bench/fusion_sft.py", *(argv if argv is not None else sys.argv[1:])]),
        "base_command": base.commands[0].command,
        "arms": results,
    }
    if {"shuffled", "grouped"} <= set(results):
        a, b = results["shuffled"], results["grouped"]
        report["grouped_over_shuffled"] = {
            k: b[k] / a[k]
            for k in ("median_step_s", "rows_per_s", "real_tokens_per_s")
            if a.get(k) and b.get(k)
        }
    (out / "fusion_sft.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"fusion SFT, the drift base's workload, {args.steps} steps a run ({report['device']})")
    print("| arm | s a step | rows/s | real tokens/s | padding | peak reserved GB | process s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for arm, r in results.items():
        reserved = r.get("max_memory_reserved_gb")
        print(f"| {arm} | {r['median_step_s']:.3f} | {r['rows_per_s']:.1f} | {r['real_tokens_per_s']:.0f} | "
              f"{100 * r['padding_share']:.0f} % | {'-' if reserved is None else f'{reserved:.1f}'} | {r['process_s']} |")  # fmt: skip
    if "grouped_over_shuffled" in report:
        print("grouped / shuffled:", {k: round(v, 3) for k, v in report["grouped_over_shuffled"].items()})


if __name__ == "__main__":
    main()
