"""Group-relative advantages, identical to TRL 1.16's ``GRPOTrainer._generate_and_score_completions``.

TRL (with its default ``multi_objective_aggregation="sum_then_normalize"``), on rewards from all ranks:

    rewards    = nansum_k(w_k * r_k)            # NaN where every reward function returned None
    mean       = nanmean over each group of G consecutive completions
    std        = unbiased nanstd per group ("group"/"none") or over the whole batch ("batch")
    advantages = rewards - mean, divided by (std + 1e-4) unless scale_rewards == "none"
    advantages = nan_to_num(advantages, nan=0.0)   # unscorable completions get no signal

and logs ``reward`` (nanmean), ``reward_std`` (nanstd of all rewards) and ``frac_reward_zero_std``
(fraction of ``isclose(std, 0)`` of the std actually used: per group, or the single batch std).

The completions of one prompt must be consecutive (``repeat_interleave`` order), as TRL's sampler makes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: Added to the std before dividing, exactly TRL's constant (not a paper value).
STD_EPS: float = 1e-4

#: ``LightningModule.all_gather`` (or any function with its shape): one tensor in, every rank's stacked out.
AllGather = Callable[[Tensor], Tensor]


def nanstd(values: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased (Bessel-corrected) std ignoring NaNs; NaN when fewer than two finite values (as TRL's)."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(values), dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = torch.sqrt(variance * correction)
    return std.squeeze() if dim is None else std.squeeze(dim)


def combine_rewards(
    rewards_per_func: Tensor, reward_weights: Sequence[float] | Tensor | None = None
) -> Tensor:
    """Weighted sum over reward functions ``(N, K) -> (N,)``.

    NaN entries (a function that does not apply to a sample) are skipped, as TRL's ``nansum``; a row where
    every function is NaN stays NaN so the baseline ignores it and its advantage ends up 0.
    """
    num_funcs = rewards_per_func.size(1)
    if reward_weights is None:
        weights = torch.ones(num_funcs, dtype=rewards_per_func.dtype, device=rewards_per_func.device)
    else:
        weights = torch.as_tensor(
            reward_weights, dtype=rewards_per_func.dtype, device=rewards_per_func.device
        )
    if weights.numel() != num_funcs:
        raise ValueError(f"got {weights.numel()} reward weights for {num_funcs} reward functions")
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    return rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))


def _grouped(rewards: Tensor, num_generations: int) -> Tensor:
    if rewards.dim() != 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"rewards must be 1-D with a multiple of num_generations={num_generations} entries, "
            f"got shape {tuple(rewards.shape)}"
        )
    return rewards.view(-1, num_generations)


def _group_std(rewards: Tensor, num_generations: int) -> Tensor:
    """Per-completion copy of its group's std (zeros for G == 1, TRL's eval-only edge case)."""
    if num_generations == 1:
        return torch.zeros_like(rewards)
    return nanstd(_grouped(rewards, num_generations), dim=1).repeat_interleave(num_generations)


def _batch_std(rewards: Tensor) -> Tensor:
    """The std of all rewards as a 0-d tensor (zero for a single reward, as TRL)."""
    return (
        nanstd(rewards)
        if rewards.numel() > 1
        else torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    )


def _gather_flat(values: Tensor, all_gather: AllGather | None) -> Tensor:
    """Rank-major concatenation; accepts gathers that stack (Lightning) or concatenate (accelerate)."""
    return values if all_gather is None else all_gather(values.detach()).reshape(-1)


def compute_advantages(
    rewards: Tensor,
    num_generations: int,
    scale_rewards: str,
    all_gather: AllGather | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Advantages for ``rewards`` (``(N,)``, in groups of ``num_generations``) and TRL's reward stats.

    Two ways to run across ranks, both equal to TRL:

    * pass rewards already gathered from all ranks (``all_gather=None``), then slice out this rank's part,
      which is what TRL does and is required when a group can straddle ranks; or
    * pass this rank's rewards with ``all_gather`` (e.g. ``LightningModule.all_gather``): every group must
      then be complete on each rank. The gather is used only for the batch std (``scale_rewards="batch"``) and
      the logged stats; group means/stds are local because the groups are.

    Returns ``(advantages (N,), stats)`` with stats ``reward``, ``reward_std`` and ``frac_reward_zero_std``
    (detached 0-d tensors, computed over all ranks when gathered).
    """
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(
            f"Invalid value for scale_rewards: {scale_rewards}. Must be one of 'batch', 'group', or 'none'."
        )
    grouped = _grouped(rewards, num_generations)
    global_rewards = _gather_flat(rewards, all_gather)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":  # one std for everyone, so frac_reward_zero_std is 0 or 1 (as TRL)
        used_std = _batch_std(global_rewards).reshape(1)
        std = used_std.expand_as(rewards)
    else:  # "none" keeps the group std only to report frac_reward_zero_std, as TRL
        std = _group_std(rewards, num_generations)
        used_std = _group_std(global_rewards, num_generations)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    stats = {
        "reward": torch.nanmean(global_rewards).detach(),
        "reward_std": nanstd(global_rewards).detach(),
        "frac_reward_zero_std": _is_zero(used_std).float().mean().detach(),
    }
    return advantages, stats


def _is_zero(std: Tensor) -> Tensor:
    return torch.isclose(std, torch.zeros_like(std))


def equal_reward_groups_mask(rewards: Tensor, num_generations: int) -> Tensor:
    """``(N // G,)`` bool, True for groups that carry no learning signal (DAPO dynamic sampling drops them).

    A group qualifies when its rewards all agree (``isclose(std, 0)``, TRL's zero-std test) or it has fewer
    than two scorable (non-NaN) rewards; either way every advantage in it is 0. Expand to completions with
    ``mask.repeat_interleave(num_generations)``.
    """
    std = nanstd(_grouped(rewards, num_generations), dim=1)
    return _is_zero(std) | torch.isnan(std)
