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

The step runner, the result readers and the report live in ``bench/proof/`` (shared with
``bench/drift_and_cure.py``, which goes on from here: drift, then two cures).

Every knob has a per-device default (``proof/learning_profiles.py``); ``--sft-override``, ``--grpo-override`` and
``--eval-override`` append raw Hydra overrides (repeatable), e.g. ``--grpo-override module.grpo.beta=0``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from proof.learning_profiles import PROFILES, SFT_SETTINGS
from proof.learning_report import (
    GRPO_SERIES,
    SFT_SERIES,
    claim_check,
    markdown,
    write_report,
)
from proof.results import data_summary, eval_results, training_summary
from proof.runs import REPO, Step, device_name, max_time, read_json, run_step, trainer_overrides

SFT_STEPS = ("data", "sft", "eval_sft")


# --------------------------------------------------------------------------- arguments
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(PROFILES), required=True)
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--seed", type=int, help="data, weights and sampling seed (default 0)")
    knobs = parser.add_argument_group("scale (defaults per --device: see proof/learning_profiles.py)")
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
