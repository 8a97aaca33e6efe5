"""Per-device settings of the drift/cure pipeline (``bench/drift_and_cure.py --set KEY=VALUE`` overrides one).

cuda: the ``small`` preset (105 M parameters, random init, real Qwen3 tokenizer) on one H100, sized so each
step fits one 10-minute GPU call (time caps below; a step that hits its cap says so in its log); base SFT
is the learning proof's H100 run (650 steps of 64 rows). cpu: a smoke run of the ``tiny`` preset that only
shows every step runs and feeds the next (its numbers mean nothing).
"""

from __future__ import annotations

from typing import Any

# Per-device defaults. cuda: the `small` preset on one H100 (minutes are estimates, each step < 10 min);
# cpu: a smoke run of the tiny model that only shows the plumbing works.
PROFILES: dict[str, dict[str, Any]] = {
    "cuda": {
        "model": "small",
        "teacher_model": "small",
        "train": 1000,
        "val": 25,
        "test": 100,
        "sft_batch": 64,
        "sft_workers": 8,
        "stage_b_ratio": 6.0,
        "base_steps": 650,
        "base_lr": 5e-4,
        "base_max_minutes": 3.5,
        "teacher_steps": 1200,
        "teacher_max_minutes": 6.0,
        "drift_steps": 300,
        "drift_lr": 2e-4,
        "drift_max_minutes": 3.0,
        "lenient_ratio": 6.0,
        "distill_per_cell": 75,
        "distill_rollouts": 4,
        "distill_epochs": 2,
        "reflection_tokens": 256,
        "distill_fallback": False,  # an empty distill file stops cure_a (the Teacher wrote no valid answer)
        "cure_a_steps": 300,
        "cure_a_lr": 2e-4,
        "cure_a_k": 4,
        "cure_a_share": 0.5,
        "cure_a_max_minutes": 3.0,
        "lora_r": 16,
        "grpo_steps": 60,
        "grpo_prompts": 16,
        "grpo_generations": 8,
        "grpo_lr": 1e-4,
        "grpo_temperature": 1.0,
        "grpo_beta": 0.04,
        "grpo_max_minutes": 3.0,
        "fail_rescue": True,
        "max_new_tokens": 64,
        "summary_tokens": 128,
        "eval_batch": 100,
        "e2e_batch": 32,
    },
    "cpu": {
        "model": "tiny",
        "teacher_model": "tiny",
        "train": 2,
        "val": 1,
        "test": 1,
        "sft_batch": 4,
        "sft_workers": 0,
        "stage_b_ratio": 2.0,
        "base_steps": 6,
        "base_lr": 3e-3,
        "base_max_minutes": 0.0,
        "teacher_steps": 4,
        "teacher_max_minutes": 0.0,
        "drift_steps": 4,
        "drift_lr": 1e-3,
        "drift_max_minutes": 0.0,
        "lenient_ratio": 2.0,
        "distill_per_cell": 1,
        "distill_rollouts": 2,
        "distill_epochs": 2,
        "reflection_tokens": 16,
        "distill_fallback": True,  # the tiny random Teacher writes nothing valid: reference answers, marked
        "cure_a_steps": 4,
        "cure_a_lr": 1e-3,
        "cure_a_k": 2,
        "cure_a_share": 0.5,
        "cure_a_max_minutes": 0.0,
        "lora_r": 4,
        "grpo_steps": 2,
        "grpo_prompts": 2,
        "grpo_generations": 2,
        "grpo_lr": 5e-4,
        "grpo_temperature": 1.0,
        "grpo_beta": 0.04,
        "grpo_max_minutes": 0.0,
        "fail_rescue": True,
        "max_new_tokens": 12,
        "summary_tokens": 12,
        "eval_batch": 8,
        "e2e_batch": 4,
    },
}
# Estimated minutes on one H100 per step (process start-up included); `--plan` prints them.
MINUTES = {"data": 0.7, "teacher": 7.0, "distill": 3.0, "base": 4.5, "drift": 3.5, "cure_a": 4.0}
MINUTES |= {"cure_b": 4.0, "cure_b_penalty": 4.0, "eval": 2.5}
