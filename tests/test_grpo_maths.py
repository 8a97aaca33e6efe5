"""Hand-checked GRPO maths: advantage edge cases, clip fractions, config validation and chunked log-probs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bbuqc_lightning.grpo import logprobs as logprobs_module
from bbuqc_lightning.grpo.advantages import (
    STD_EPS,
    combine_rewards,
    compute_advantages,
    equal_reward_groups_mask,
)
from bbuqc_lightning.grpo.config import GRPOConfig
from bbuqc_lightning.grpo.logprobs import completion_logprobs
from bbuqc_lightning.grpo.loss import grpo_loss, k3_kl

# ------------------------------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_all_equal_group_gets_zero_advantage(scale_rewards: str) -> None:
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    advantages, stats = compute_advantages(rewards, 4, scale_rewards)
    assert torch.equal(advantages[:4], torch.zeros(4))
    assert advantages[4:].abs().min() > 0
    expected_zero_std = {"group": 0.5, "batch": 0.0, "none": 0.5}[scale_rewards]
    assert stats["frac_reward_zero_std"].item() == expected_zero_std


def test_group_scaling_uses_unbiased_std_plus_eps() -> None:
    rewards = torch.tensor([0.0, 1.0, 0.0, 1.0, 2.0, 2.0, 2.0, 6.0])
    advantages, _ = compute_advantages(rewards, 4, "group")
    std_first = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected
    expected_first = (torch.tensor([0.0, 1.0, 0.0, 1.0]) - 0.5) / (std_first + STD_EPS)
    torch.testing.assert_close(advantages[:4], expected_first)
    std_second = torch.tensor([2.0, 2.0, 2.0, 6.0]).std(unbiased=True)
    torch.testing.assert_close(
        advantages[4:], (torch.tensor([2.0, 2.0, 2.0, 6.0]) - 3.0) / (std_second + STD_EPS)
    )


def test_batch_scaling_uses_one_std_and_none_only_centres() -> None:
    rewards = torch.tensor([0.0, 1.0, 3.0, 5.0])
    batch, _ = compute_advantages(rewards, 2, "batch")
    centred = torch.tensor([-0.5, 0.5, -1.0, 1.0])
    torch.testing.assert_close(batch, centred / (rewards.std(unbiased=True) + STD_EPS))
    none, _ = compute_advantages(rewards, 2, "none")
    torch.testing.assert_close(none, centred)


def test_unscorable_completion_is_excluded_from_baseline() -> None:
    rewards_per_func = torch.tensor(
        [[1.0, float("nan")], [0.0, 0.0], [float("nan"), float("nan")], [0.5, 0.5]]
    )
    rewards = combine_rewards(rewards_per_func, [2.0, 1.0])
    assert torch.isnan(rewards[2])
    torch.testing.assert_close(rewards[[0, 1, 3]], torch.tensor([2.0, 0.0, 1.5]))
    advantages, stats = compute_advantages(rewards, 4, "none")
    assert advantages[2].item() == 0.0
    torch.testing.assert_close(advantages[[0, 1, 3]], torch.tensor([2.0, 0.0, 1.5]) - 3.5 / 3)
    torch.testing.assert_close(stats["reward"], torch.tensor(3.5 / 3))


def test_equal_reward_groups_mask_flags_uninformative_groups() -> None:
    nan = float("nan")
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, nan, 2.0, nan, 0.5, 0.5, nan])
    assert equal_reward_groups_mask(rewards, 3).tolist() == [True, False, True, True]


def test_all_gather_feeds_batch_std_and_stats_only() -> None:
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0, 2.0, 0.0, 3.0, 1.0])
    other_rank = torch.tensor([5.0, 5.0, 5.0, 5.0, 0.0, 1.0, 0.0, 1.0])
    everything = torch.cat([other_rank, rewards])
    gathered, stats = compute_advantages(
        rewards, 4, "batch", all_gather=lambda t: torch.stack([other_rank, t])
    )
    centred = rewards - rewards.view(2, 4).mean(1).repeat_interleave(4)  # groups stay local
    torch.testing.assert_close(gathered, centred / (everything.std(unbiased=True) + STD_EPS))
    torch.testing.assert_close(stats["reward"], everything.mean())
    _, group_stats = compute_advantages(
        rewards, 4, "group", all_gather=lambda t: torch.stack([other_rank, t])
    )
    assert group_stats["frac_reward_zero_std"].item() == 0.25


def test_bad_reward_shape_or_setting_raises() -> None:
    with pytest.raises(ValueError, match="multiple of num_generations"):
        compute_advantages(torch.zeros(5), 4, "group")
    with pytest.raises(ValueError, match="scale_rewards"):
        compute_advantages(torch.zeros(4), 4, "std")
    with pytest.raises(ValueError, match="reward weights"):
        combine_rewards(torch.zeros(4, 2), [1.0])


# ------------------------------------------------------------------------------------------------------- loss


def _loss(per_token_logps: torch.Tensor, old: torch.Tensor | None, advantages: torch.Tensor, **kwargs):
    mask = kwargs.pop("mask", torch.ones_like(per_token_logps))
    defaults = {"loss_type": "bnpo", "beta": 0.0, "epsilon_low": 0.2, "epsilon_high": 0.28}
    return grpo_loss(per_token_logps, old, None, advantages, mask, **(defaults | kwargs))


def test_clip_fractions_and_clipped_tokens_get_no_gradient() -> None:
    ratios = torch.tensor([[1.5, 1.0, 0.5, 1.1], [1.5, 1.0, 0.5, 0.9]])
    old = torch.zeros(2, 4)
    logps = ratios.log().requires_grad_(True)
    loss, metrics = _loss(logps, old, torch.tensor([1.0, -1.0]))
    loss.backward()
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(1 / 8)  # 1.5 > 1.28 with A > 0
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 8)  # 0.5 < 0.8 with A < 0
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(2 / 8)
    assert metrics["clip_ratio/high_max"].item() == pytest.approx(1 / 4)
    assert metrics["clip_ratio/low_min"].item() == 0.0
    assert logps.grad[0, 0] == 0 and logps.grad[1, 2] == 0  # clipped
    assert logps.grad[0, 2] != 0 and logps.grad[1, 0] != 0  # pessimistic side keeps the unclipped term


def test_no_old_logps_is_plain_policy_gradient() -> None:
    logps = torch.full((2, 3), -1.0, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    advantages = torch.tensor([2.0, -1.0])
    loss, metrics = _loss(logps, None, advantages, mask=mask, loss_type="dapo", num_items_in_batch=3)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(-(2.0 * 2 - 1.0) / 3))
    torch.testing.assert_close(logps.grad, -advantages.unsqueeze(1) * mask / 3)
    assert metrics["clip_ratio/region_mean"].item() == 0.0


def test_k3_kl_is_zero_at_reference_and_positive_elsewhere() -> None:
    logps = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.equal(k3_kl(logps, logps), torch.zeros(3))
    assert (k3_kl(logps, logps + torch.tensor([0.3, -0.3, 1.0])) > 0).all()


def test_metrics_all_gather_of_identical_ranks_match_local() -> None:
    gen = torch.Generator().manual_seed(0)
    logps, old = -torch.rand(4, 5, generator=gen), -torch.rand(4, 5, generator=gen)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    _, local = _loss(logps, old, advantages)
    _, gathered = _loss(logps, old, advantages, all_gather=lambda t: torch.stack([t, t]))
    for name, value in local.items():
        torch.testing.assert_close(gathered[name], value)


def test_missing_inputs_raise() -> None:
    logps = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        _loss(logps, None, torch.ones(1), loss_type="dapo")
    with pytest.raises(ValueError, match="max_completion_length"):
        _loss(logps, None, torch.ones(1), loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        _loss(logps, None, torch.ones(1), beta=0.1)
    with pytest.raises(ValueError, match="Unknown loss type"):
        _loss(logps, None, torch.ones(1), loss_type="cispo")


# ----------------------------------------------------------------------------------------------------- config


def test_config_defaults_follow_trl_where_not_overridden() -> None:
    config = GRPOConfig()
    assert config.loss_type == "dapo" and config.scale_rewards == "group"
    assert config.resolved_epsilon_high == config.epsilon == 0.2
    assert GRPOConfig(epsilon_high=0.28).resolved_epsilon_high == 0.28


def test_config_reports_every_problem_at_once() -> None:
    with pytest.raises(ValueError) as info:
        GRPOConfig(
            num_generations=1, temperature=0.0, loss_type="ppo", scale_rewards=True, delta=0.9, top_p="x"
        )
    message = str(info.value)
    assert "6 problem(s)" in message
    for field_name in ("num_generations", "temperature", "loss_type", "scale_rewards", "delta", "top_p"):
        assert field_name in message


def test_config_warns_for_sequence_level_with_token_sum_loss() -> None:
    with pytest.warns(UserWarning, match="sequence"):
        GRPOConfig(importance_sampling_level="sequence", loss_type="dapo")


# --------------------------------------------------------------------------------------------------- logprobs


def _naive_logprobs(hidden, weight, ids, temperature):
    logits = (hidden @ weight.T).float() / temperature
    return logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_full_softmax_with_gradients(temperature: float) -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=gen, requires_grad=True)
    weight = torch.randn(97, 16, generator=gen, requires_grad=True)
    ids = torch.randint(0, 97, (3, 7), generator=gen)
    expected = _naive_logprobs(hidden, weight, ids, temperature)
    got = completion_logprobs(hidden, weight, ids, chunk_size=4, temperature=temperature)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    upstream = torch.randn(3, 7, generator=gen)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    got_grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_chunked_logprobs_skip_masked_positions() -> None:
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 5, 8, generator=gen), torch.randn(33, 8, generator=gen)
    ids = torch.randint(0, 33, (2, 5), generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = completion_logprobs(hidden, weight, ids, chunk_size=3, completion_mask=mask)
    torch.testing.assert_close(got, _naive_logprobs(hidden, weight, ids, 1.0) * mask, atol=1e-5, rtol=1e-5)


def test_all_masked_batch_still_backpropagates() -> None:
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    ids, mask = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)
    logps = completion_logprobs(hidden, torch.randn(20, 8), ids, chunk_size=4, completion_mask=mask)
    assert torch.equal(logps, torch.zeros(2, 3))
    logps.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_chunking_bounds_the_logits_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every LM-head projection, forward and backward recomputation, sees at most ``chunk_size`` tokens."""
    rows_seen: list[int] = []
    original = logprobs_module._chunk_logps

    def recording(hidden, *args):
        rows_seen.append(hidden.shape[0])
        return original(hidden, *args)

    monkeypatch.setattr(logprobs_module, "_chunk_logps", recording)
    hidden = torch.randn(4, 10, 8, requires_grad=True)
    completion_logprobs(
        hidden, torch.randn(50, 8), torch.randint(0, 50, (4, 10)), chunk_size=6
    ).sum().backward()
    assert max(rows_seen) <= 6
    assert sum(rows_seen) == 2 * 40  # each token once in forward, once in the checkpointed backward
    assert hidden.grad is not None


def test_bf16_hidden_states_match_fp32_softmax_of_bf16_logits() -> None:
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 6, 16, generator=gen).bfloat16()
    weight = torch.randn(64, 16, generator=gen).bfloat16()
    ids = torch.randint(0, 64, (2, 6), generator=gen)
    expected = (
        F.linear(hidden, weight).float().div(0.7).log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    )
    got = completion_logprobs(hidden, weight, ids, chunk_size=5, temperature=0.7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
