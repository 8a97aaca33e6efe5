"""GRPO policy loss with the maths of TRL 1.16's ``GRPOTrainer._compute_loss`` (tested for parity against it).

Where this departs from TRL / the paper:

1. KL: the k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` per token, added as ``beta * kl`` to each
   token's clipped surrogate before aggregation, as TRL and the DeepSeekMath GRPO objective do. TRL's optional
   ``use_bias_correction_kl`` (KL times the importance ratio) is not implemented.
2. Aggregation follows TRL, not the paper: the default ``loss_type="dapo"`` divides the summed token losses by
   the loss-token count of the whole generation batch over all ranks (``num_items_in_batch``) divided by the
   number of processes, whereas the GRPO paper averages each sequence over its own length first
   (``loss_type="grpo"``).
3. Only ``grpo``, ``bnpo``, ``dr_grpo`` and ``dapo`` are implemented; TRL's ``cispo``, ``sapo``, ``luspo`` and
   ``vespo`` are not.
4. No entropy masking (TRL ``top_entropy_quantile``), no entropy bonus, no off-policy sequence mask
   (``off_policy_mask_threshold``), no vLLM importance-sampling correction, no tool masks and no MoE auxiliary
   loss. Entropy is not computed, so TRL's ``entropy`` metric is absent.
5. Importance sampling is per token by default (``importance_sampling_level="token"``); ``"sequence"`` (GSPO)
   uses TRL's length-normalised sequence log-ratio.
6. When ``old_per_token_logps`` is ``None`` the ratio is ``exp(logp - logp.detach()) == 1``, as TRL does when
   ``num_iterations == 1`` and generation is aligned with optimiser steps (TRL's rule
   ``GA % (steps_per_generation * num_iterations) != 0``; GRPOModule optimises each generation batch right away,
   so it keeps old log-probs exactly when ``num_iterations > 1``); the
   clipping then never triggers and the gradient is the plain policy gradient.
7. ``delta`` (two-sided clipping, INTELLECT-2) caps the unclipped ratio after the clipped one is formed, and
   TRL's clip-ratio metrics are computed from that capped ratio; both are reproduced as is.
8. Gradient-accumulation scaling is a parameter: TRL divides ``grpo``/``bnpo``/``dr_grpo`` by its accumulation
   steps and folds them into the ``dapo`` normaliser. A loop that divides by the accumulation steps itself
   (Lightning automatic optimisation) must pass ``gradient_accumulation_steps=1`` to obtain TRL's gradients.
9. Metrics are this rank's unless ``all_gather`` is given, in which case they are TRL's cross-rank values.
10. DAPO's dynamic sampling is not part of the loss (TRL 1.16 has none);
    ``advantages.equal_reward_groups_mask`` only flags the groups a caller may drop, and dropping them changes
    the ``dapo`` token count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bbuqc_lightning.grpo.advantages import AllGather
from bbuqc_lightning.grpo.config import LOSS_TYPES  # torch-free: the config check imports it before torch


def k3_kl(per_token_logps: Tensor, ref_per_token_logps: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): unbiased, always >= 0, low variance (Schulman)."""
    diff = ref_per_token_logps - per_token_logps
    return torch.exp(diff) - diff - 1


def global_token_count(loss_mask: Tensor, all_gather: AllGather | None = None) -> Tensor:
    """``num_items_in_batch`` for ``dapo``: loss tokens summed over ranks (TRL ``gather(mask.sum()).sum()``).

    Count it over the whole generation batch, before it is split into micro-batches.
    """
    count = loss_mask.sum()
    return count if all_gather is None else all_gather(count).sum()


def _log_importance_weights(log_ratio: Tensor, mask: Tensor, level: str) -> Tensor:
    """``(B, T)`` token log-ratios, or ``(B, 1)`` length-normalised sequence log-ratios (GSPO)."""
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(
        f"Unknown importance sampling level: {level}. Possible values are 'token' and 'sequence'."
    )


def _clipped_surrogate(
    coef_1: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float, delta: float | None
) -> tuple[Tensor, Tensor]:
    """PPO-clip per-token loss and the (delta-capped) ratio that TRL's clip metrics read."""
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    return -torch.min(coef_1 * advantages, coef_2 * advantages), coef_1


def _aggregate(
    per_token_loss: Tensor,
    mask: Tensor,
    loss_type: str,
    *,
    num_items_in_batch: Tensor | float | None,
    max_completion_length: int | None,
    num_processes: int,
    accumulation: int,
    steps_per_generation: int,
) -> Tensor:
    """Reduce token losses to a scalar the way TRL does for ``loss_type`` (``accumulation`` is 1 in eval)."""
    if loss_type == "grpo":  # mean over each sequence, then over sequences (fully masked rows count as 0)
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if loss_type == "bnpo":  # mean over this micro-batch's loss tokens
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":  # constant normaliser: local batch size times the completion budget
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length) / accumulation
    if loss_type == "dapo":  # global token mean over the generation batch, per accumulation window
        if num_items_in_batch is None:
            raise ValueError("loss_type='dapo' needs num_items_in_batch (see global_token_count)")
        num_items = torch.as_tensor(num_items_in_batch, device=per_token_loss.device)
        normalizer = num_items.clamp(min=1.0) / num_processes
        normalizer = normalizer * accumulation / steps_per_generation
        return (per_token_loss * mask).sum() / normalizer
    raise ValueError(f"Unknown loss type: {loss_type}. Supported: {LOSS_TYPES}")


def _global_masked_mean(x: Tensor, mask: Tensor, all_gather: AllGather | None) -> Tensor:
    """Token-weighted mean over all ranks (per-sequence values when ``x`` is ``(B, 1)``), as TRL logs it."""
    if x.shape[1] == 1:
        totals = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
    else:
        totals = torch.stack([(x * mask).sum(), mask.sum().float()])
    if all_gather is not None:
        totals = all_gather(totals).reshape(-1, 2).sum(0)
    return totals[0] / totals[1].clamp(min=1.0)


def _masked_seq_mean(x: Tensor, mask: Tensor, all_gather: AllGather | None) -> Tensor:
    """Per-sequence mean (NaN for a fully masked row, skipped by nanmin/nanmax), gathered over ranks."""
    values = x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)
    return values if all_gather is None else all_gather(values).reshape(-1)


def _nan_extreme(values: Tensor, reduce: Callable[[Tensor], Tensor]) -> Tensor:
    finite = values[~torch.isnan(values)]
    return reduce(finite) if finite.numel() else torch.tensor(float("nan"), device=values.device)


def _metrics(
    coef_1: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon_low: float,
    epsilon_high: float,
    gather: AllGather | None,
) -> dict[str, Tensor]:
    """TRL's clip-ratio metrics: fractions of loss tokens whose ratio was clipped below/above."""
    low = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    high = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    return {
        "clip_ratio/low_mean": _global_masked_mean(low.float(), mask, gather),
        "clip_ratio/high_mean": _global_masked_mean(high.float(), mask, gather),
        "clip_ratio/region_mean": _global_masked_mean((low | high).float(), mask, gather),
        "clip_ratio/low_min": _nan_extreme(_masked_seq_mean(low.float(), mask, gather), torch.min),
        "clip_ratio/high_max": _nan_extreme(_masked_seq_mean(high.float(), mask, gather), torch.max),
    }


def grpo_loss(
    per_token_logps: Tensor,
    old_per_token_logps: Tensor | None,
    ref_per_token_logps: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    loss_type: str,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    num_items_in_batch: Tensor | float | None = None,
    max_completion_length: int | None = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
    steps_per_generation: int | None = None,
    training: bool = True,
    all_gather: AllGather | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The value TRL's ``_compute_loss`` returns for the same micro-batch, and its logged metrics.

    Args:
        per_token_logps: ``(B, T)`` current-policy log-probs of the completion tokens (carries the gradient).
        old_per_token_logps: ``(B, T)`` log-probs at generation time, or ``None`` (ratio 1; see
            ``num_iterations > 1``).
        ref_per_token_logps: ``(B, T)`` reference log-probs; required when ``beta != 0``.
        advantages: ``(B,)`` (or ``(B, T)``) advantages from ``compute_advantages``.
        completion_mask: ``(B, T)`` 1 for loss tokens (truncated rows zeroed when ``grpo.mask_truncated_completions``).
        num_items_in_batch: ``dapo`` only: loss tokens of the whole generation batch over all ranks.
        max_completion_length: ``dr_grpo`` only: the completion budget (``max_new_tokens``).
        num_processes: data-parallel world size (``dapo`` divides ``num_items_in_batch`` by it; DDP then
            averages gradients over ranks, giving a global token mean).
        gradient_accumulation_steps: TRL's ``current_gradient_accumulation_steps``; pass 1 when the training
            loop divides the loss by its accumulation steps itself (Lightning automatic optimisation does).
        steps_per_generation: micro-batches one generation batch (hence ``num_items_in_batch``) spans;
            ``None`` means ``gradient_accumulation_steps``, TRL's default.
        training: ``False`` reproduces TRL's eval path (no accumulation scaling).
        all_gather: optional rank-major gather (Lightning ``all_gather`` or accelerate ``gather``) used only
            for metrics, making them TRL's cross-rank values.

    Returns ``(loss, metrics)``: metrics are detached 0-d tensors named as TRL logs them (``kl`` only when
    ``beta != 0``; ``clip_ratio/{low_mean,high_mean,region_mean,low_min,high_max}``).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown loss type: {loss_type}. Supported: {LOSS_TYPES}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    log_weights = _log_importance_weights(
        per_token_logps - old_per_token_logps, completion_mask, importance_sampling_level
    )
    coef_1 = torch.exp(log_weights)
    per_token_loss, capped_coef_1 = _clipped_surrogate(coef_1, advantages, epsilon_low, epsilon_high, delta)
    metrics: dict[str, Tensor] = {}
    if beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("beta != 0 needs ref_per_token_logps")
        per_token_kl = k3_kl(per_token_logps, ref_per_token_logps)
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = _global_masked_mean(per_token_kl.detach(), completion_mask, all_gather)
    accumulation, spg = 1, 1  # TRL's eval path: the batch is neither split across steps nor accumulated
    if training:
        accumulation = gradient_accumulation_steps
        spg = gradient_accumulation_steps if steps_per_generation is None else steps_per_generation
    loss = _aggregate(
        per_token_loss,
        completion_mask,
        loss_type,
        num_items_in_batch=num_items_in_batch,
        max_completion_length=max_completion_length,
        num_processes=num_processes,
        accumulation=accumulation,
        steps_per_generation=spg,
    )
    clip = _metrics(
        capped_coef_1.detach(), advantages, completion_mask, epsilon_low, epsilon_high, all_gather
    )
    metrics.update(clip)
    return loss, {k: v.detach() for k, v in metrics.items()}
