"""Configuration of the training-free Stage-B runner (``module.runner`` in ``conf/module/stage_b_runner.yaml``).

One dataclass for the runner, one for the optional final rollout that distillation adds; every field
has a one-line help comment, and ``__post_init__`` reports every inconsistency at once.

Example::

    >>> RunnerConfig(output_dir="out", num_rollouts=2).num_rollouts
    2
    >>> RunnerConfig(output_dir="out", num_rollouts=0)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ValueError: Invalid module.runner: num_rollouts must be >= 1, got 0
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunnerConfig:
    """How the runner samples, reflects and keeps guidance."""

    output_dir: str  # per-mission artifact folders go under <output_dir>/<mission slug>/
    num_rollouts: int = 4  # K sampled answers per group and epoch
    temperature: float = 0.7  # sampling temperature of the K rollouts
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    max_new_tokens: int = 128  # per rollout; raise it when the Teacher thinks (generation.enable_thinking)
    reflection_max_new_tokens: int = 1024  # the reflection's JSON answer
    reflection_temperature: float = 0.0  # 0: greedy reflection
    max_reflection_cases: int = 8  # mistakes shown per mission and round (false passes first)
    max_operations_per_round: int = 5  # further operations of one answer are rejected
    max_experiences: int = 20  # guidance size cap: an 'add' beyond it is rejected
    max_experience_chars: int = 200  # one experience is one line of at most this many characters
    initial_guidance: str | None = None  # guidance JSON (one mission or a mapping) seeding new missions
    snapshot_retention: int | None = None  # keep the newest N snapshots per mission; null keeps all
    review_mode: bool = False  # true: proposals go to pending_proposals.jsonl, applied only when approved
    fsync: bool = True  # fsync every streamed artifact line (crash-safe; set false on slow disks)
    num_table_samples: int = 8  # selection rows per epoch in the W&B table

    def __post_init__(self) -> None:
        problems = []
        positive = {
            "num_rollouts": self.num_rollouts,
            "max_new_tokens": self.max_new_tokens,
            "reflection_max_new_tokens": self.reflection_max_new_tokens,
            "max_reflection_cases": self.max_reflection_cases,
            "max_operations_per_round": self.max_operations_per_round,
            "max_experiences": self.max_experiences,
            "max_experience_chars": self.max_experience_chars,
        }
        problems += [f"{name} must be >= 1, got {value}" for name, value in positive.items() if value < 1]
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0 (the K rollouts are sampled), got {self.temperature}")
        if self.reflection_temperature < 0:
            problems.append(f"reflection_temperature must be >= 0, got {self.reflection_temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.snapshot_retention is not None and self.snapshot_retention < 1:
            problems.append(f"snapshot_retention must be >= 1 or null, got {self.snapshot_retention}")
        if problems:
            raise ValueError("Invalid module.runner: " + "; ".join(problems))


@dataclass
class FinalRolloutConfig:
    """The distillation pass: one more epoch under the converged guidance, without reflection.

    It runs after the last reflection round (convergence or ``trainer.max_epochs - 1`` rounds), on
    ``size`` groups per mission drawn with ``seed`` (all groups when ``size`` is null), at ``temperature``.
    """

    enabled: bool = False
    temperature: float = 0.3  # low: the selected answer should be the Teacher's considered one
    size: int | None = None  # groups per mission; null: every group
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.temperature <= 0:
            problems.append(f"distill_temperature must be > 0, got {self.temperature}")
        if self.size is not None and self.size < 1:
            problems.append(f"distill_size must be >= 1 or null, got {self.size}")
        if problems:
            raise ValueError("Invalid stage_b_distillation: " + "; ".join(problems))
