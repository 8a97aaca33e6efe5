"""Stage-B GRPO hyper-parameters, mirroring the subset of ``trl.GRPOConfig`` (TRL 1.16) that our loss uses.

Field names follow TRL so a value can be read against TRL's documentation, except ``max_new_tokens``
(TRL: ``max_completion_length``), which also serves as the ``dr_grpo`` normalising constant, as in TRL.
Defaults are ours where the project chose them (noted in each help string) and TRL's otherwise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence")


@dataclass
class GRPOConfig:
    """GRPO settings; ``__post_init__`` validates them all at once and raises a single ``ValueError``."""

    num_generations: int = field(
        default=4, metadata={"help": "Completions sampled per prompt (G); TRL default 8; must be >= 2."}
    )
    temperature: float = field(
        default=0.7,
        metadata={
            "help": "Sampling temperature; log-probs are computed from logits / temperature, as in TRL."
        },
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus-sampling mass in (0, 1]; 1.0 disables it."})
    max_new_tokens: int = field(
        default=128,
        metadata={
            "help": "Completion token budget (TRL max_completion_length); also the dr_grpo normaliser."
        },
    )
    learning_rate: float = field(
        default=5e-6, metadata={"help": "Optimiser learning rate (project choice; TRL default 1e-6)."}
    )
    beta: float = field(
        default=0.04,
        metadata={
            "help": "k3-KL coefficient against the reference policy; 0 skips the reference (TRL default 0)."
        },
    )
    epsilon: float = field(
        default=0.2, metadata={"help": "Lower clip range: ratios below 1 - epsilon are clipped."}
    )
    epsilon_high: float | None = field(
        default=None,
        metadata={"help": "Upper clip range (DAPO clip-higher, e.g. 0.28); None means equal to epsilon."},
    )
    delta: float | None = field(
        default=None,
        metadata={
            "help": "Two-sided GRPO (INTELLECT-2): cap the unclipped ratio at delta (> 1); None disables."
        },
    )
    loss_type: str = field(
        default="dapo",
        metadata={"help": "Loss aggregation: grpo | bnpo | dr_grpo | dapo (TRL 1.16 default: dapo)."},
    )
    importance_sampling_level: str = field(
        default="token",
        metadata={"help": "Importance ratio per 'token' (GRPO) or per 'sequence' (GSPO), as in TRL."},
    )
    scale_rewards: str = field(
        default="group",
        metadata={"help": "Advantage std scaling: 'group' (per prompt), 'batch' (whole batch) or 'none'."},
    )
    num_iterations: int = field(
        default=1,
        metadata={"help": "Optimisation passes per generated batch (mu); > 1 needs stored old log-probs."},
    )
    mask_truncated_completions: bool = field(
        default=False,
        metadata={"help": "Exclude completions that hit max_new_tokens without EOS from the loss (DAPO)."},
    )
    dynamic_sampling: bool = field(
        default=False,
        metadata={
            "help": "Skip groups whose G rewards are all equal (zero advantage); not a TRL 1.16 option."
        },
    )
    fail_rescue: bool = field(
        default=False,
        metadata={
            "help": "In a fail ticket's group with no valid 不通过 sample, rewrite one valid answer's verdict to "
            "不通过 and train only its verdict tokens (grpo/rescue.py); not a TRL option."
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Per-reward-function weights summed into one reward; None weights all by 1.0."},
    )
    logprob_chunk_size: int = field(
        default=512,
        metadata={
            "help": "Completion tokens per LM-head chunk when computing log-probs (bounds fp32 logits)."
        },
    )

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            listing = "\n".join(f"  - {p}" for p in problems)
            raise ValueError(f"Invalid GRPOConfig ({len(problems)} problem(s)):\n{listing}")
        if self.importance_sampling_level == "sequence" and self.loss_type != "grpo":
            warnings.warn(
                f"importance_sampling_level='sequence' with loss_type='{self.loss_type}' sums per-token "
                "losses of one sequence ratio; GSPO's setup is loss_type='grpo' (TRL warns likewise).",
                UserWarning,
                stacklevel=3,
            )

    @property
    def epsilon_low(self) -> float:
        """Lower clip range, named as in TRL's trainer."""
        return self.epsilon

    @property
    def resolved_epsilon_high(self) -> float:
        """Upper clip range with TRL's fallback ``epsilon_high or epsilon`` applied."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def _problems(self) -> list[str]:
        """Every invalid setting, so a Hydra override typo is reported together with the rest.

        Each condition is a thunk so a wrongly typed value (e.g. a string) is reported, not raised mid-pass.
        """
        problems: list[str] = []

        def check(condition: Callable[[], bool], message: str) -> None:
            try:
                ok = bool(condition())
            except TypeError:
                ok = False
            if not ok:
                problems.append(message)

        eps_high, delta, weights = self.epsilon_high, self.delta, self.reward_weights
        check(
            lambda: _int(self.num_generations) >= 2,
            f"num_generations must be an int >= 2, got {self.num_generations!r}",
        )
        check(lambda: _real(self.temperature) > 0.0, f"temperature must be > 0, got {self.temperature!r}")
        check(lambda: 0.0 < _real(self.top_p) <= 1.0, f"top_p must be in (0, 1], got {self.top_p!r}")
        check(
            lambda: _int(self.max_new_tokens) >= 1,
            f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}",
        )
        check(
            lambda: _real(self.learning_rate) > 0.0, f"learning_rate must be > 0, got {self.learning_rate!r}"
        )
        check(lambda: _real(self.beta) >= 0.0, f"beta must be >= 0, got {self.beta!r}")
        check(lambda: 0.0 <= _real(self.epsilon) < 1.0, f"epsilon must be in [0, 1), got {self.epsilon!r}")
        check(
            lambda: eps_high is None or _real(eps_high) >= 0.0,
            f"epsilon_high must be None or >= 0, got {eps_high!r}",
        )
        check(
            lambda: delta is None or _real(delta) > 1.0,
            f"delta must be None or > 1 (it caps the ratio), got {delta!r}",
        )
        check(
            lambda: self.loss_type in LOSS_TYPES,
            f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}",
        )
        check(
            lambda: self.importance_sampling_level in IMPORTANCE_SAMPLING_LEVELS,
            f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
            f"got {self.importance_sampling_level!r}",
        )
        check(
            lambda: self.scale_rewards in SCALE_REWARDS,
            f"scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}",
        )
        check(
            lambda: _int(self.num_iterations) >= 1,
            f"num_iterations must be an int >= 1, got {self.num_iterations!r}",
        )
        check(
            lambda: weights is None or (len(weights) > 0 and all(math.isfinite(_real(w)) for w in weights)),
            f"reward_weights must be None or a non-empty list of finite numbers, got {weights!r}",
        )
        check(
            lambda: _int(self.logprob_chunk_size) >= 1,
            f"logprob_chunk_size must be an int >= 1, got {self.logprob_chunk_size!r}",
        )
        return problems


def _int(value: object) -> int:
    """The value if it is a true int (bool excluded); otherwise ``TypeError`` so ``check`` reports it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(value)
    return value


def _real(value: object) -> float:
    """The value as a float if it is an int/float (bool excluded); NaN then fails every comparison."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(value)
    return float(value)
