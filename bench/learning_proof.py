"""Learning proof: a Qwen3-VL-shaped model trained from scratch on the synthetic benchmark, SFT then GRPO.

A random-init model with the real Qwen3 tokenizer (``model=small`` on a GPU, ``model=tiny`` for a CPU
rehearsal) goes through the project's own entry points, each run as a subprocess with explicit overrides:

1. ``tools/make_synthetic.py``: the synthetic benchmark (groups per mission per split; test held out);
2. ``+experiment=fusion_sft module.finetune=full``: fusion SFT from scratch (summaries + Stage-B verdicts +
   the auxiliary sources of ``conf/fusion/default.yaml``), every LLM weight trains, writes ``<run>/model``;
3. ``+experiment=eval`` of that folder on the test split;
4. ``+experiment=grpo`` from that folder (``model.random_init=false``): LoRA on every layer, rewards label
   1.0 + format 0.2 (+ the false-pass penalty when ``--false-pass-penalty`` is set; off by default, and
   only effective with ``--scale-rewards batch`` or ``none``: group standardisation cancels it);
5. ``+experiment=eval`` of the folder + the GRPO adapter on the test split.

Writes to ``--out``: ``learning_proof.json`` (settings, every command with its run folder, W&B run folder
and wall time, metrics per mission and overall after SFT and after GRPO, counts, the claim check) and
``learning_proof.md`` (the same as tables), ``logs/<step>.log``, ``runs/<step>/`` (Hydra run folders),
``data/synthetic/``. W&B runs offline (``wandb sync <out>/runs/*/wandb/offline-run-*`` uploads them).

The claim under test: GRPO lowers the false-pass rate (误放行率) on the test split, at a false-fail rate of
no more than 5 %. Invalid answers count in neither rate (SPEC §6), so read them with format-valid rate.

Commands::

    python bench/learning_proof.py --device cuda --out outputs/learning_proof          # one H100, ~8 min
    python bench/learning_proof.py --device cpu --out outputs/learning_proof_cpu       # CPU rehearsal, ~8 min
    python bench/learning_proof.py --device cpu --out outputs/lp_smoke --sft-steps 20 --grpo-steps 2 \\
        --train 8 --val 4 --test 4                                                     # smoke run, ~2 min
    python bench/learning_proof.py --device cuda --out outputs/lp_penalty --false-pass-penalty 0.5 \\
        --scale-rewards batch --reuse-sft outputs/learning_proof    # a second GRPO arm, same SFT model

Every knob has a per-device default (``PROFILES``); ``--sft-override``, ``--grpo-override`` and
``--eval-override`` append raw Hydra overrides (repeatable), e.g. ``--grpo-override module.grpo.beta=0``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bbuqc_lightning.constants import MISSIONS

REPO = Path(__file__).resolve().parents[1]
METRICS = ("format_valid_rate", "accuracy", "false_pass_rate", "false_fail_rate")
CLAIM_MAX_FALSE_FAIL = 0.05
SFT_STEPS = ("data", "sft", "eval_sft")
# Settings that define the data, the SFT model and its evaluation: --reuse-sft takes them from that run.
SFT_SETTINGS = (
    "model",
    "seed",
    "train",
    "val",
    "test",
    "sft_steps",
    "sft_batch",
    "sft_lr",
    "sft_workers",
    "stage_b_ratio",
    "max_new_tokens",
)

# Per-device defaults. cuda: sized for one H100 (whole pipeline ~8 min); cpu: a rehearsal on 2 cores.
PROFILES: dict[str, dict[str, Any]] = {
    "cuda": {
        "model": "small",
        "train": 1000,  # groups per mission: 4000 train tickets, ~16000 photos
        "val": 25,
        "test": 100,  # 400 held-out tickets (200 pass / 200 fail)
        "sft_steps": 1200,
        "sft_batch": 64,  # 1200 x 64 rows: ~38k Stage-B rows, each train ticket seen ~10 times
        "sft_lr": 5e-4,
        "sft_workers": 8,  # collation (tokenising, image processing) off the training loop
        "sft_max_minutes": 3.5,  # safety caps: the whole script stays inside a 10-minute GPU session
        "grpo_max_minutes": 2.5,
        "stage_b_ratio": 6.0,  # Stage-B rows per epoch = 6 x tickets: about half of every batch
        "grpo_steps": 100,
        "grpo_prompts": 16,
        "grpo_generations": 8,
        "grpo_lr": 1e-4,
        "grpo_lora_r": 16,
        "grpo_temperature": 1.0,
        "grpo_beta": 0.04,
        "max_new_tokens": 64,
        "eval_batch": 100,
    },
    "cpu": {
        "model": "tiny",
        "train": 64,
        "val": 8,
        "test": 16,
        "sft_steps": 300,
        "sft_batch": 8,
        "sft_lr": 3e-3,
        "sft_workers": 0,  # 2 cores: worker processes would compete with torch's threads
        "sft_max_minutes": 0.0,  # 0: no time cap
        "grpo_max_minutes": 0.0,
        "stage_b_ratio": 4.0,
        "grpo_steps": 10,
        "grpo_prompts": 4,
        "grpo_generations": 4,
        "grpo_lr": 5e-4,
        "grpo_lora_r": 16,
        "grpo_temperature": 1.0,
        "grpo_beta": 0.04,
        "max_new_tokens": 48,
        "eval_batch": 32,
    },
}


@dataclass
class Step:
    """One subprocess of the pipeline and what it left behind."""

    name: str
    argv: list[str]
    run_dir: Path | None = None
    seconds: float = 0.0
    wandb_runs: list[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        """The command as typed in the folder the script runs from (``python``: this interpreter)."""
        return shlex.join(["python", *self.argv[1:]])

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "command": self.command,
            "run_dir": None if self.run_dir is None else str(self.run_dir),
            "wandb_runs": self.wandb_runs,
            "seconds": round(self.seconds, 1),
        }


# --------------------------------------------------------------------------- arguments
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(PROFILES), required=True)
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--seed", type=int, help="data, weights and sampling seed (default 0)")
    knobs = parser.add_argument_group("scale (defaults per --device: see PROFILES)")
    knobs.add_argument("--model", help="conf/model preset with random_init (small | tiny | ...)")
    for split in ("train", "val", "test"):
        knobs.add_argument(f"--{split}", type=int, help=f"{split} groups per mission")
    knobs.add_argument("--sft-steps", type=int, help="fusion SFT optimiser steps")
    knobs.add_argument("--sft-batch", type=int, help="fusion rows per SFT step")
    knobs.add_argument("--sft-lr", type=float, help="peak learning rate (one-cycle: 5 %% warm-up, cosine)")
    knobs.add_argument("--sft-workers", type=int, help="DataLoader worker processes of the SFT run")
    knobs.add_argument(
        "--sft-max-minutes", type=float, help="stop SFT training after this long (0: never; reported)"
    )
    knobs.add_argument(
        "--grpo-max-minutes", type=float, help="stop GRPO training after this long (0: never; reported)"
    )
    knobs.add_argument("--stage-b-ratio", type=float, help="Stage-B target ratio of the fusion mix")
    knobs.add_argument("--grpo-steps", type=int, help="GRPO steps (one generation batch each)")
    knobs.add_argument("--grpo-prompts", type=int, help="tickets per GRPO step")
    knobs.add_argument("--grpo-generations", type=int, help="completions per ticket (G)")
    knobs.add_argument("--grpo-lr", type=float, help="GRPO learning rate (LoRA on every layer)")
    knobs.add_argument("--grpo-lora-r", type=int, help="GRPO LoRA rank (alpha = 2 r)")
    knobs.add_argument("--grpo-temperature", type=float, help="GRPO sampling temperature")
    knobs.add_argument("--grpo-beta", type=float, help="GRPO KL coefficient")
    knobs.add_argument("--max-new-tokens", type=int, help="answer budget for GRPO and eval")
    knobs.add_argument("--eval-batch", type=int, help="tickets per eval generation batch")
    parser.add_argument(
        "--false-pass-penalty",
        type=float,
        default=0.0,
        help="weight of the false-pass penalty reward in GRPO (default 0: label + format only); needs "
        "--scale-rewards batch or none",
    )
    parser.add_argument(
        "--scale-rewards",
        choices=("group", "batch", "none"),
        default="group",
        help="GRPO advantage scaling (default: group, the project's default)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="capture the engine's decode step as CUDA graphs (GRPO, eval); a few per run, under a second each",
    )
    parser.add_argument(
        "--reuse-sft",
        metavar="EARLIER_OUT",
        help="run only GRPO and its eval, from the data and SFT model of an earlier --out (its SFT settings "
        "and SFT results are taken over)",
    )
    parser.add_argument("--sft-override", action="append", default=[], help="extra Hydra override (SFT)")
    parser.add_argument("--grpo-override", action="append", default=[], help="extra Hydra override (GRPO)")
    parser.add_argument("--eval-override", action="append", default=[], help="extra Hydra override (evals)")
    args = parser.parse_args(argv)
    problems = []
    args.earlier = None
    if args.reuse_sft:
        args.earlier, problem = earlier_report(Path(args.reuse_sft))
        if problem:
            parser.error(problem)
        for key in SFT_SETTINGS:
            value, given = args.earlier["settings"][key], getattr(args, key)
            if given is not None and given != value:
                option = "--" + key.replace("_", "-")
                problems.append(f"{option} comes from the reused run ({value!r}), not {given!r}: drop it")
            setattr(args, key, value)
    for key, value in {**PROFILES[args.device], "seed": 0}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    problems += [
        f"--{key.replace('_', '-')} must be positive"
        for key in ("train", "val", "test", "sft_batch", "grpo_prompts", "eval_batch")
        if getattr(args, key) < 1
    ]
    if args.sft_workers < 0:
        problems.append("--sft-workers must be >= 0")
    if min(args.sft_max_minutes, args.grpo_max_minutes) < 0:
        problems.append("--sft-max-minutes and --grpo-max-minutes must be >= 0 (0: no cap)")
    if args.sft_steps < 4:
        problems.append("--sft-steps must be >= 4 (warm-up and decay of the learning-rate schedule)")
    if args.grpo_steps < 0:
        problems.append("--grpo-steps must be >= 0")
    if args.grpo_generations < 2:
        problems.append("--grpo-generations must be >= 2 (GRPO compares completions of one ticket)")
    if args.false_pass_penalty < 0:
        problems.append("--false-pass-penalty is a weight >= 0 (the reward itself is -1 for a false pass)")
    if args.false_pass_penalty > 0 and args.scale_rewards == "group":
        # In a fail ticket's group the penalty only stretches the gap between right and wrong verdicts;
        # dividing by the group's std undoes that, so the advantages (and the run) barely change.
        problems.append(
            "--false-pass-penalty has next to no effect with --scale-rewards group (each group's rewards "
            "are standardised, which cancels it): add --scale-rewards batch or none"
        )
    if not (REPO / "conf" / "model" / f"{args.model}.yaml").is_file():
        problems.append(f"--model {args.model!r}: no conf/model/{args.model}.yaml")
    elif not yaml.safe_load((REPO / "conf" / "model" / f"{args.model}.yaml").read_text()).get("random_init"):
        problems.append(f"--model {args.model!r} is not a random-init preset: this proof trains from scratch")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        problems.append(f"--out {out} exists and is not empty: pick a new folder")
    if problems:
        parser.error("; ".join(problems))
    return args


def earlier_report(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The ``learning_proof.json`` of an earlier run whose SFT model can be reused, or a problem."""
    path = folder / "learning_proof.json"
    if not path.is_file():
        return None, f"--reuse-sft {folder}: no learning_proof.json there"
    report = read_json(path)
    done = {step["name"] for step in report.get("steps", [])}
    if not set(SFT_STEPS) <= done or "sft" not in report.get("results", {}):
        return None, f"--reuse-sft {folder}: that run did not finish {', '.join(SFT_STEPS)}"
    if not (folder / "runs" / "sft" / "model" / "config.json").is_file():
        return None, f"--reuse-sft {folder}: no SFT model folder at runs/sft/model"
    return report, None


def num_layers(model: str) -> int:
    arch = yaml.safe_load((REPO / "conf" / "model" / f"{model}.yaml").read_text())["architecture"]
    return int(arch["text"]["num_hidden_layers"])


# --------------------------------------------------------------------------- commands
def trainer_overrides(device: str, precision: str | None) -> list[str]:
    """CPU: the default trainer (fp32). CUDA: ``trainer=gpu`` (bf16-mixed) unless ``precision`` is given."""
    if device == "cpu":
        return ["trainer=default"]
    return ["trainer=gpu", *([f"trainer.precision={precision}"] if precision else [])]


def max_time(minutes: float) -> list[str]:
    """Lightning's ``max_time`` ("DD:HH:MM:SS"): training stops there even before ``max_steps``."""
    if minutes <= 0:
        return []
    seconds = round(minutes * 60)
    return [f"++trainer.max_time=00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"]


def common_overrides(args: argparse.Namespace, run_dir: Path, data_dir: Path, tag: str) -> list[str]:
    return [
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={data_dir}",
        f"seed={args.seed}",
        "logger=wandb",
        f"tags=[learning_proof,{tag}]",
        "extras.print_config=false",
        "trainer.enable_progress_bar=false",
    ]


def build_steps(args: argparse.Namespace) -> dict[str, Step]:
    """Every step to run, in order (without data / SFT / SFT eval when ``--reuse-sft`` is given)."""
    out = Path(args.out)
    base = Path(args.reuse_sft) if args.reuse_sft else out  # where the data and the SFT run live
    data_dir = base / "data"
    runs = out / "runs"
    train = [sys.executable, "-m", "bbuqc_lightning.train"]
    model = [f"model={args.model}"]
    sft_dir, grpo_dir = base / "runs" / "sft", runs / "grpo"
    from_sft = [*model, "model.random_init=false", f"model.model_name_or_path={sft_dir / 'model'}"]
    no_ckpt = ["callbacks.model_checkpoint=null", "++trainer.enable_checkpointing=false"]
    sft_val_every = max(1, args.sft_steps // 4)
    grpo_val_every = max(1, args.grpo_steps // 2)
    # One-cycle: 5 % warm-up (at least 2 steps) to the peak, cosine down to ~0 (from scratch, a schedule
    # matters); the optimiser's own lr is replaced by the schedule's.
    warmup = max(2, round(0.05 * args.sft_steps)) / args.sft_steps
    scheduler = (
        "{_target_:torch.optim.lr_scheduler.OneCycleLR,_partial_:true,"
        f"max_lr:{args.sft_lr},total_steps:{args.sft_steps},pct_start:{warmup:.4g},cycle_momentum:false}}"
    )
    r = args.grpo_lora_r
    steps = {
        "data": Step(
            "data",
            [
                sys.executable,
                os.path.relpath(REPO / "tools" / "make_synthetic.py"),
                f"--out={data_dir / 'synthetic'}",
                f"--seed={args.seed}",
                f"--train={args.train}",
                f"--val={args.val}",
                f"--test={args.test}",
            ],
        ),
        "sft": Step(
            "sft",
            [
                *train,
                "+experiment=fusion_sft",
                *model,
                *trainer_overrides(args.device, "bf16-mixed"),  # fp32 master weights: from scratch
                *common_overrides(args, sft_dir, data_dir, "sft"),
                "module.finetune=full",
                f"module.optimizer.lr={args.sft_lr}",
                f"module.scheduler={scheduler}",
                f"data.variables.stage_b_ratio={args.stage_b_ratio}",
                f"data.batch_size={args.sft_batch}",
                f"data.val_batch_size={args.sft_batch}",
                f"data.num_workers={args.sft_workers}",
                f"trainer.max_steps={args.sft_steps}",
                "trainer.max_epochs=-1",
                f"trainer.val_check_interval={sft_val_every}",
                "trainer.limit_val_batches=4",
                *max_time(args.sft_max_minutes),
                *no_ckpt,
                *args.sft_override,
            ],
            sft_dir,
        ),
        "eval_sft": Step(
            "eval_sft", eval_argv(args, train, from_sft, runs / "eval_sft", data_dir, None), runs / "eval_sft"
        ),
    }
    if args.reuse_sft:
        steps = {}
    if args.grpo_steps == 0:
        return steps
    rewards = f"[1.0,0.2,{args.false_pass_penalty}]"
    steps["grpo"] = Step(
        "grpo",
        [
            *train,
            "+experiment=grpo",
            *from_sft,
            *trainer_overrides(args.device, None),
            *common_overrides(args, grpo_dir, data_dir, "grpo"),
            f"module.lora.k={num_layers(args.model)}",
            f"module.lora.r={r}",
            f"module.lora.alpha={2 * r}",
            "module.lora.dropout=0.0",
            f"module.grpo.learning_rate={args.grpo_lr}",
            f"module.grpo.num_generations={args.grpo_generations}",
            f"module.grpo.temperature={args.grpo_temperature}",
            f"module.grpo.beta={args.grpo_beta}",
            f"module.grpo.max_new_tokens={args.max_new_tokens}",
            f"module.grpo.reward_weights={rewards}",
            f"module.grpo.scale_rewards={args.scale_rewards}",
            f"module.micro_batch_size={args.grpo_prompts * args.grpo_generations}",
            f"generation.cuda_graphs={str(args.cuda_graphs).lower()}",
            f"data.batch_size={args.grpo_prompts}",
            f"data.val_batch_size={args.eval_batch}",
            f"trainer.max_steps={args.grpo_steps}",
            "trainer.max_epochs=-1",
            f"trainer.val_check_interval={grpo_val_every}",
            "trainer.limit_val_batches=1",
            *max_time(args.grpo_max_minutes),
            *no_ckpt,
            *args.grpo_override,
        ],
        grpo_dir,
    )
    steps["eval_grpo"] = Step(
        "eval_grpo",
        eval_argv(args, train, from_sft, runs / "eval_grpo", data_dir, grpo_dir / "adapter"),
        runs / "eval_grpo",
    )
    return steps


def eval_argv(
    args: argparse.Namespace,
    train: list[str],
    from_sft: list[str],
    run_dir: Path,
    data_dir: Path,
    adapter: Path | None,
) -> list[str]:
    return [
        *train,
        "+experiment=eval",
        *from_sft,
        *trainer_overrides(args.device, None),
        *common_overrides(args, run_dir, data_dir, "eval"),
        *([f"module.adapter_path={adapter}"] if adapter else []),
        f"module.max_new_tokens={args.max_new_tokens}",
        f"generation.cuda_graphs={str(args.cuda_graphs).lower()}",
        f"data.batch_size={args.eval_batch}",
        *args.eval_override,
    ]


def run_step(step: Step, logs: Path) -> None:
    """Run ``step`` (from the current folder), its output in ``logs/<name>.log``; exit on failure."""
    log_path = logs / f"{step.name}.log"
    print(f"[{time.strftime('%H:%M:%S')}] {step.name}: {step.command}", flush=True)
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    start = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        code = subprocess.call(step.argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    step.seconds = time.perf_counter() - start
    if code != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        sys.exit(f"error: step {step.name} failed (exit {code}); log {log_path}:\n" + "\n".join(tail))
    if step.run_dir is not None:
        step.wandb_runs = sorted(str(p) for p in step.run_dir.glob("wandb/offline-run-*"))
    print(f"  done in {step.seconds:.0f} s", flush=True)


# --------------------------------------------------------------------------- results
def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


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


def eval_results(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``{scope: {metric: rate, metric_n: "k/n", ...}}`` from ``metrics.json``, checked against the counts."""
    metrics = read_json(run_dir / "metrics.json")
    counts = verdict_counts(run_dir / "predictions.jsonl")
    out: dict[str, dict[str, Any]] = {}
    for scope, c in counts.items():
        row: dict[str, Any] = {"counts": c}
        for name in METRICS:
            key = f"test/{name}" if scope == "all" else f"test/{name}/{scope}"
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
    import csv

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


# --------------------------------------------------------------------------- report
def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


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


def device_name(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)" if device == "cpu" else "cuda (not visible to this process)"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    steps = build_steps(args)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "earlier")}
    report: dict[str, Any] = {
        "settings": {**settings, "out": str(out), "device_name": device_name(args.device)},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "total_seconds": 0.0,
        "steps": [],
    }
    if args.earlier is not None:  # the reused data, SFT run and its eval, as that run recorded them
        earlier = args.earlier
        report["steps"] = [{**s, "reused": True} for s in earlier["steps"] if s["name"] in SFT_STEPS]
        report["data"] = earlier["data"]
        report["training"] = {"sft": earlier["training"]["sft"]}
        report["results"] = {"sft": earlier["results"]["sft"]}
    start = time.perf_counter()
    for step in steps.values():
        run_step(step, out / "logs")
        report["steps"].append(step.record())
        report["total_seconds"] = time.perf_counter() - start
        if step.name == "data":
            report["data"] = data_summary(out / "data")
        elif step.name in ("sft", "grpo"):
            keys = SFT_SERIES if step.name == "sft" else GRPO_SERIES
            report.setdefault("training", {})[step.name] = training_summary(steps[step.name].run_dir, keys)
        elif step.name.startswith("eval_"):
            report.setdefault("results", {})[step.name.removeprefix("eval_")] = eval_results(step.run_dir)
        write_report(out, report)  # after every step: a failed run still leaves what it did
    if "grpo" in report.get("results", {}):
        report["claim"] = claim_check(report["results"])
    write_report(out, report)
    print(markdown(report))
    print(f"wrote {out / 'learning_proof.json'} and {out / 'learning_proof.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
