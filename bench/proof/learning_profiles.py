"""Per-device settings of the learning proof (``bench/learning_proof.py``); each is also a command-line option.

cuda: the ``small`` preset on one H100, the whole pipeline in ~8 minutes; cpu: a rehearsal on 2 cores (its
numbers only show every step runs and feeds the next).
"""

from __future__ import annotations

from typing import Any

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
