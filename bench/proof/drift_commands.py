"""Command lines of the drift/cure pipeline: each one a run of the project's own entry points.

Every builder returns ``argv`` for :class:`proof.runs.Step`; ``s`` is the pipeline's settings dict
(``bench/proof/drift_profiles.py``: ``PROFILES`` plus the command line). Nothing here runs anything.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from proof.runs import REPO, max_time, trainer_overrides

TRAIN = [sys.executable, "-m", "bbuqc_lightning.train"]
NO_CKPT = ["callbacks.model_checkpoint=null", "++trainer.enable_checkpointing=false"]


def num_layers(model: str) -> int:
    """Decoder layers of a ``conf/model`` preset (LoRA on "all layers" needs the number)."""
    arch = yaml.safe_load((REPO / "conf" / "model" / f"{model}.yaml").read_text())["architecture"]
    return int(arch["text"]["num_hidden_layers"])


def base_model_overrides(s: Mapping[str, Any]) -> list[str]:
    """The base's random-init model: the ``s["model"]`` preset, its vision tower resized by ``base_vision_depth`` /
    ``base_vision_width`` (0: the preset's; DeepStack from the middle block, the MLP twice the width, as the
    preset) and trained with the LLM unless ``base_freeze_vision`` (``module.freeze_vision=false``: a random-init tower
    has never learned to see; the stages after the base keep it frozen, as the product does)."""
    vision = "model.architecture.vision"
    depth, width = s["base_vision_depth"], s["base_vision_width"]
    return [
        f"model={s['model']}",
        *([f"{vision}.depth={depth}", f"{vision}.deepstack_visual_indexes=[{depth // 2}]"] if depth else []),
        *([f"{vision}.hidden_size={width}", f"{vision}.intermediate_size={2 * width}"] if width else []),
        *([] if s["base_freeze_vision"] else ["module.freeze_vision=false"]),
    ]


def common(s: Mapping[str, Any], run_dir: Path, seed: int, tag: str) -> list[str]:
    """Overrides every run shares: its folder, the data folder, the seed, W&B offline with tags."""
    return [
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={s['data_dir']}",
        f"seed={seed}",
        "logger=wandb",
        f"tags=[drift_and_cure,{tag}]",
        "extras.print_config=false",
        "trainer.enable_progress_bar=false",
        *([f"generation.kv_memory_gb={s['kv_memory_gb']}"] if s.get("kv_memory_gb") else []),
    ]


def from_folder(model: str, folder: Path) -> list[str]:
    """Start from a saved model folder (random-init presets write ``<run>/model``; exports write one too)."""
    return [f"model={model}", "model.random_init=false", f"model.model_name_or_path={folder}"]


def one_cycle(lr: float, steps: int) -> str:
    """One-cycle schedule: 5 % warm-up (at least 2 steps) to ``lr``, cosine down to ~0."""
    warmup = max(2, round(0.05 * steps)) / steps
    return (
        "{_target_:torch.optim.lr_scheduler.OneCycleLR,_partial_:true,"
        f"max_lr:{lr},total_steps:{steps},pct_start:{warmup:.4g},cycle_momentum:false}}"
    )


def data_argv(s: Mapping[str, Any]) -> list[str]:
    return [
        sys.executable,
        os.path.relpath(REPO / "tools" / "make_synthetic.py"),
        f"--out={Path(s['data_dir']) / 'synthetic'}",
        f"--seed={s['data_seed']}",
        f"--train={s['train']}",
        f"--val={s['val']}",
        f"--test={s['test']}",
    ]


def sft_argv(
    s: Mapping[str, Any],
    run_dir: Path,
    seed: int,
    tag: str,
    *,
    model: list[str],
    steps: int,
    lr: float,
    fusion: str | Path = "default",
    lora_k: int | None = None,
    max_minutes: float = 0.0,
    stage_b_ratio: float | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """Fusion SFT: full fine-tuning (``lora_k`` None, writes ``<run>/model``) or LoRA on the top ``lora_k``
    layers (writes ``<run>/adapter``), one-cycle schedule over ``steps``."""
    finetune = (
        ["module.finetune=full"]
        if lora_k is None
        else [
            "module.finetune=lora",
            f"module.lora.k={lora_k}",
            f"module.lora.r={s['lora_r']}",
            f"module.lora.alpha={2 * s['lora_r']}",
            "module.lora.dropout=0.0",
        ]
    )
    return [
        *TRAIN,
        "+experiment=fusion_sft",
        *model,
        *trainer_overrides(s["device"], "bf16-mixed"),
        *common(s, run_dir, seed, tag),
        *finetune,
        f"data.fusion={fusion}",
        f"module.optimizer.lr={lr}",
        f"module.scheduler={one_cycle(lr, steps)}",
        f"data.variables.stage_b_ratio={s['stage_b_ratio'] if stage_b_ratio is None else stage_b_ratio}",
        f"data.batch_size={s['sft_batch']}",
        f"data.val_batch_size={s['sft_batch']}",
        f"data.num_workers={s['sft_workers']}",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=-1",
        f"trainer.val_check_interval={max(1, steps // 4)}",
        "trainer.limit_val_batches=4",
        *max_time(max_minutes),
        *NO_CKPT,
        *extra,
    ]


def grpo_argv(
    s: Mapping[str, Any],
    run_dir: Path,
    seed: int,
    tag: str,
    *,
    model: list[str],
    penalty: float,
    scale: str,
    lr: float,
    beta: float,
) -> list[str]:
    """Stage-B GRPO from a model folder: LoRA on every layer (as the learning proof), label 1.0 + format
    0.2 (+ the false-pass penalty), ``fail_rescue`` as configured."""
    r = s["lora_r"]
    return [
        *TRAIN,
        "+experiment=grpo",
        *model,
        *trainer_overrides(s["device"], None),
        *common(s, run_dir, seed, tag),
        f"module.lora.k={num_layers(s['model'])}",
        f"module.lora.r={r}",
        f"module.lora.alpha={2 * r}",
        "module.lora.dropout=0.0",
        f"module.grpo.learning_rate={lr}",
        f"module.grpo.num_generations={s['grpo_generations']}",
        f"module.grpo.temperature={s['grpo_temperature']}",
        f"module.grpo.beta={beta}",
        f"module.grpo.max_new_tokens={s['max_new_tokens']}",
        f"module.grpo.reward_weights=[1.0,0.2,{penalty}]",
        f"module.grpo.scale_rewards={scale}",
        f"module.grpo.fail_rescue={str(s['fail_rescue']).lower()}",
        f"module.micro_batch_size={s['grpo_prompts'] * s['grpo_generations']}",
        f"generation.max_rows={s['grpo_prompts'] * s['grpo_generations']}",  # a step's rollouts in one wave
        f"data.batch_size={s['grpo_prompts']}",
        f"data.val_batch_size={s['eval_batch']}",
        f"trainer.max_steps={s['grpo_steps']}",
        "trainer.max_epochs=-1",
        f"trainer.val_check_interval={max(1, s['grpo_steps'] // 2)}",
        "trainer.limit_val_batches=1",
        *max_time(s["grpo_max_minutes"]),
        *NO_CKPT,
    ]


def export_argv(base: Path, adapter: Path, out: Path) -> list[str]:
    """Merge a LoRA run into its base folder: the next step's input is again one model folder."""
    return [
        sys.executable,
        os.path.relpath(REPO / "tools" / "export.py"),
        f"--base={base}",
        f"--adapter={adapter}",
        f"--out={out}",
        "--dtype=float32",
    ]


def distill_argv(s: Mapping[str, Any], run_dir: Path, teacher: Path, inputs: Path) -> list[str]:
    """``tools/distill.py`` with the Teacher folder: reflection rounds, then the final rollout (chatml)."""
    return [
        sys.executable,
        os.path.relpath(REPO / "tools" / "distill.py"),
        *from_folder(s["teacher_model"], teacher),
        *trainer_overrides(s["device"], None),
        *common(s, run_dir, s["seeds"][0], "distill"),
        f"data.train_jsonl={inputs}",
        f"data.batch_size={s['eval_batch']}",
        f"trainer.max_epochs={s['distill_epochs']}",
        f"module.runner.num_rollouts={s['distill_rollouts']}",
        f"module.runner.max_new_tokens={s['max_new_tokens']}",
        f"module.runner.reflection_max_new_tokens={s['reflection_tokens']}",
        f"stage_b_distillation.conflict_policy={s['conflict_policy']}",
    ]


def eval_argv(s: Mapping[str, Any], run_dir: Path, seed: int, model: list[str], tag: str) -> list[str]:
    """Stage-B on the held-out reference summaries (``test/*``)."""
    return [
        *TRAIN,
        "+experiment=eval",
        *model,
        *trainer_overrides(s["device"], None),
        *common(s, run_dir, seed, tag),
        f"module.max_new_tokens={s['max_new_tokens']}",
        f"data.batch_size={s['eval_batch']}",
    ]


def e2e_argv(s: Mapping[str, Any], run_dir: Path, seed: int, model: list[str], tag: str) -> list[str]:
    """Held-out photos -> own summaries -> own verdicts (``e2e/*``) and those summaries' ``stage_a/*``."""
    return [
        *TRAIN,
        "+experiment=e2e",
        *model,
        *trainer_overrides(s["device"], None),
        *common(s, run_dir, seed, tag),
        f"module.max_new_tokens={s['max_new_tokens']}",
        f"module.stage_a_max_new_tokens={s['summary_tokens']}",
        f"data.batch_size={s['e2e_batch']}",
    ]
