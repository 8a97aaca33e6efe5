"""Parity of ``bbuqc_lightning.grpo`` with TRL 1.16's real ``GRPOTrainer`` code on identical random inputs.

TRL's methods are called unbound on a ``SimpleNamespace`` holding exactly the attributes they read; the model,
generation and reward calls are replaced by stubs returning the given tensors. A missing attribute raises
``AttributeError``, so a TRL upgrade that reads something new fails loudly instead of silently diverging.
"""

from __future__ import annotations

import contextlib
import types
from collections import defaultdict
from typing import Any

import pytest
import torch
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import selective_log_softmax as trl_selective_log_softmax

from bbuqc_lightning.grpo.advantages import combine_rewards, compute_advantages
from bbuqc_lightning.grpo.logprobs import completion_logprobs, selective_log_softmax
from bbuqc_lightning.grpo.loss import global_token_count, grpo_loss
from bbuqc_lightning.grpo.rollout import completion_masks

TOL = {"atol": 1e-6, "rtol": 1e-6}
EOS, PAD = 2, 0
G = 4


class FakeAccelerator:
    """One-process accelerator (identity gathers); ``num_processes`` only feeds TRL's ``dapo`` normaliser."""

    def __init__(self, num_processes: int = 1, process_index: int = 0) -> None:
        self.device = torch.device("cpu")
        self.num_processes = num_processes
        self.process_index = process_index

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def _metrics_store() -> dict[str, defaultdict[str, list[float]]]:
    return {"train": defaultdict(list), "eval": defaultdict(list)}


# ------------------------------------------------------------------------------------------------------- loss


def _random_batch(seed: int, batch: int = 8, length: int = 9) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logps = -2.0 * torch.rand(batch, length, generator=gen)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = length
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    mask[-1] = 0  # a completion removed by grpo.mask_truncated_completions
    advantages = torch.randn(batch, generator=gen).abs() * torch.tensor([1.0, -1.0]).repeat(batch // 2)
    advantages[1] = 0.0  # signs alternate so both the low and the high clip bound are exercised
    return {
        "logps": logps,
        "old": logps
        + 0.4 * torch.randn(batch, length, generator=gen),  # num_iterations > 1: policy has moved
        "ref": logps + 0.3 * torch.randn(batch, length, generator=gen),
        "mask": mask,
        "advantages": advantages,
        "completion_ids": torch.randint(3, 50, (batch, length), generator=gen) * mask,
    }


def _trl_loss(
    data: dict[str, torch.Tensor], *, old: bool, settings: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[float]]]:
    """Run TRL's ``GRPOTrainer._compute_loss``; returns (loss, d loss / d logps, logged metrics)."""
    logps = data["logps"].clone().requires_grad_(True)
    mode = "train" if settings["training"] else "eval"
    trainer = types.SimpleNamespace(
        accelerator=FakeAccelerator(num_processes=settings["num_processes"]),
        model=types.SimpleNamespace(training=settings["training"]),
        args=types.SimpleNamespace(
            delta=settings["delta"], use_bias_correction_kl=False, steps_per_generation=settings["spg"]
        ),
        loss_type=settings["loss_type"],
        beta=settings["beta"],
        epsilon_low=settings["eps_low"],
        epsilon_high=settings["eps_high"],
        importance_sampling_level=settings["level"],
        max_completion_length=settings["max_len"],
        current_gradient_accumulation_steps=settings["ga"],
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        aux_loss_enabled=False,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        _entropy_bonus_enabled=False,
        _metrics=_metrics_store(),
    )
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (
        logps,
        torch.zeros_like(logps),
        None,
    )
    batch = data["mask"].shape[0]
    inputs = {
        "prompt_ids": torch.ones(batch, 3, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 3, dtype=torch.long),
        "completion_ids": data["completion_ids"],
        "completion_mask": data["mask"],
        "advantages": data["advantages"],
        "num_items_in_batch": settings["num_items"],
    }
    if old:
        inputs["old_per_token_logps"] = data["old"]
    if settings["beta"] != 0.0:
        inputs["ref_per_token_logps"] = data["ref"]
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    (grad,) = torch.autograd.grad(loss, logps)
    return loss.detach(), grad, trainer._metrics[mode]


def _our_loss(
    data: dict[str, torch.Tensor], *, old: bool, settings: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    logps = data["logps"].clone().requires_grad_(True)
    loss, metrics = grpo_loss(
        logps,
        data["old"] if old else None,
        data["ref"] if settings["beta"] != 0.0 else None,
        data["advantages"],
        data["mask"],
        loss_type=settings["loss_type"],
        beta=settings["beta"],
        epsilon_low=settings["eps_low"],
        epsilon_high=settings["eps_high"],
        delta=settings["delta"],
        importance_sampling_level=settings["level"],
        num_items_in_batch=settings["num_items"],
        max_completion_length=settings["max_len"],
        num_processes=settings["num_processes"],
        gradient_accumulation_steps=settings["ga"],
        steps_per_generation=settings["spg"],
        training=settings["training"],
    )
    (grad,) = torch.autograd.grad(loss, logps)
    return loss.detach(), grad, metrics


def _settings(data: dict[str, torch.Tensor], **overrides: Any) -> dict[str, Any]:
    settings = {
        "loss_type": "dapo",
        "beta": 0.0,
        "eps_low": 0.2,
        "eps_high": 0.2,
        "delta": None,
        "level": "token",
        "max_len": data["mask"].shape[1] + 3,
        "ga": 1,
        "spg": 1,
        "num_processes": 1,
        "training": True,
        "num_items": data["mask"].sum() * 2,  # pretend the generation batch spans a second micro-batch / rank
    }
    settings.update(overrides)
    return settings


def _assert_same(data: dict[str, torch.Tensor], *, old: bool, settings: dict[str, Any]) -> None:
    trl_loss, trl_grad, trl_metrics = _trl_loss(data, old=old, settings=settings)
    our_loss, our_grad, our_metrics = _our_loss(data, old=old, settings=settings)
    torch.testing.assert_close(our_loss, trl_loss, **TOL)
    torch.testing.assert_close(our_grad, trl_grad, **TOL)
    expected = {k: v[-1] for k, v in trl_metrics.items() if k != "entropy"}  # we do not compute entropy
    assert set(our_metrics) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(
            our_metrics[name].double(), torch.tensor(value, dtype=torch.float64), **TOL
        )


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("old", [False, True], ids=["old=None", "num_iterations>1"])
def test_loss_matches_trl(loss_type: str, beta: float, old: bool) -> None:
    data = _random_batch(seed=LOSS_TYPES.index(loss_type) * 4 + 2 * int(beta > 0) + int(old))
    _assert_same(data, old=old, settings=_settings(data, loss_type=loss_type, beta=beta))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize(
    ("eps_high", "delta", "level"),
    [(0.28, None, "token"), (0.28, 1.5, "token"), (0.2, None, "sequence"), (0.28, 1.3, "sequence")],
)
def test_clipping_variants_match_trl(
    loss_type: str, eps_high: float, delta: float | None, level: str
) -> None:
    data = _random_batch(seed=7)
    settings = _settings(data, loss_type=loss_type, beta=0.04, eps_high=eps_high, delta=delta, level=level)
    _assert_same(data, old=True, settings=settings)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize(
    ("ga", "spg", "num_processes", "training"),
    [(4, 4, 1, True), (4, 2, 2, True), (2, 8, 4, True), (4, 4, 2, False)],
)
def test_accumulation_and_world_size_scaling_match_trl(
    loss_type: str, ga: int, spg: int, num_processes: int, training: bool
) -> None:
    data = _random_batch(seed=11)
    settings = _settings(
        data, loss_type=loss_type, ga=ga, spg=spg, num_processes=num_processes, training=training
    )
    _assert_same(data, old=True, settings=settings)


# --------------------------------------------------------------------------------------- advantages / masking


def _completions(seed: int, num: int, max_len: int) -> list[list[int]]:
    """Completions as TRL lists them: up to and including EOS, or ``max_len`` tokens without EOS."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num):
        length = int(torch.randint(1, max_len + 1, (1,), generator=gen))
        ids = torch.randint(3, 50, (length,), generator=gen).tolist()
        if i % 3 != 0 and length < max_len:  # every third completion runs out of budget
            ids[-1] = EOS
        else:
            ids = (ids + [7] * max_len)[:max_len]
        out.append(ids)
    return out


def _rewards_per_func(seed: int, num: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (num, 2), generator=gen).float() * 0.5
    rewards[:G] = torch.tensor([1.0, 0.5])  # a group whose rewards are all equal
    rewards[G + 1, 1] = float("nan")  # a reward function that does not apply to one sample
    rewards[2 * G + 2] = float("nan")  # an unscorable completion
    return rewards


def _trl_generate_and_score(
    rewards_per_func: torch.Tensor,
    completion_ids: list[list[int]],
    *,
    scale_rewards: str,
    weights: list[float],
    mask_truncated: bool,
    process_index: int = 0,
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Run TRL's ``GRPOTrainer._generate_and_score_completions`` for this rank's ``completion_ids``.

    ``rewards_per_func`` holds all ranks' rewards, as TRL's ``_calculate_rewards`` returns them.
    """
    num_local = len(completion_ids)
    trainer = types.SimpleNamespace(
        accelerator=FakeAccelerator(process_index=process_index),
        model=types.SimpleNamespace(training=True, is_gradient_checkpointing=False),
        args=types.SimpleNamespace(
            per_device_train_batch_size=num_local,
            steps_per_generation=1,
            gradient_accumulation_steps=1,
            gradient_checkpointing_kwargs=None,
        ),
        environment_factories=None,
        environments=None,
        tools=None,
        _tokenizer=types.SimpleNamespace(pad_token_id=PAD),
        eos_token_ids=[EOS],
        pad_to_multiple_of=None,
        mask_truncated_completions=mask_truncated,
        num_iterations=1,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        beta=0.0,
        num_generations=G,
        multi_objective_aggregation="sum_then_normalize",
        reward_weights=torch.tensor(weights),
        scale_rewards=scale_rewards,
        reward_func_names=["format", "accuracy"],
        log_multimodal=False,
        _metrics=_metrics_store(),
        _logs={
            "prompt": [],
            "completion": [],
            "advantages": [],
            "images": [],
            "rewards": defaultdict(list),
            "extra": defaultdict(list),
        },
        _pending_extra_logs={},
        _pending_metrics={},
    )
    prompt_ids = [[5, 6, 7]] * num_local
    texts = [str(ids) for ids in completion_ids]
    trainer._generate = lambda prompts: (prompt_ids, completion_ids, None, texts, None, {}, None, None)
    trainer._calculate_rewards = lambda *args: rewards_per_func
    output = GRPOTrainer._generate_and_score_completions(trainer, [{"prompt": "p"}] * num_local)
    return output, trainer._metrics["train"]


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("mask_truncated", [False, True])
def test_advantages_and_truncation_mask_match_trl(scale_rewards: str, mask_truncated: bool) -> None:
    num, weights = 4 * G, [1.0, 0.5]
    rewards_per_func = _rewards_per_func(seed=3, num=num)
    completion_ids = _completions(seed=5, num=num, max_len=6)
    trl_out, trl_metrics = _trl_generate_and_score(
        rewards_per_func,
        completion_ids,
        scale_rewards=scale_rewards,
        weights=weights,
        mask_truncated=mask_truncated,
    )
    advantages, stats = compute_advantages(combine_rewards(rewards_per_func, weights), G, scale_rewards)
    torch.testing.assert_close(advantages, trl_out["advantages"], **TOL)
    for name in ("reward", "reward_std", "frac_reward_zero_std"):
        torch.testing.assert_close(stats[name].double(), torch.tensor(trl_metrics[name][-1]).double(), **TOL)

    # The rollout's own masks (grpo/rollout.py), truncated rows dropped as GRPOModule._loss_mask does.
    mask, truncated = completion_masks(trl_out["completion_ids"], [EOS])
    if mask_truncated:
        mask = mask * (~truncated).unsqueeze(1).int()
        assert 0 < int(truncated.sum()) < num
    mask = mask.to(trl_out["completion_mask"].dtype)
    assert torch.equal(mask, trl_out["completion_mask"])
    assert torch.equal(global_token_count(mask), trl_out["num_items_in_batch"])


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_rank_slice_matches_trl(scale_rewards: str) -> None:
    """Rank 1 of 2: TRL normalises the gathered rewards and slices; we either slice or gather inside."""
    num_local, weights = 2 * G, [1.0, 0.5]
    rewards_per_func = _rewards_per_func(seed=9, num=2 * num_local)
    completion_ids = _completions(seed=4, num=num_local, max_len=6)
    trl_out, trl_metrics = _trl_generate_and_score(
        rewards_per_func,
        completion_ids,
        scale_rewards=scale_rewards,
        weights=weights,
        mask_truncated=False,
        process_index=1,
    )
    rewards = combine_rewards(rewards_per_func, weights)
    sliced, _ = compute_advantages(rewards, G, scale_rewards)
    torch.testing.assert_close(sliced[num_local:], trl_out["advantages"], **TOL)

    rank0, rank1 = rewards[:num_local], rewards[num_local:]
    local, stats = compute_advantages(rank1, G, scale_rewards, all_gather=lambda t: torch.stack([rank0, t]))
    torch.testing.assert_close(local, trl_out["advantages"], **TOL)
    torch.testing.assert_close(
        stats["reward_std"].double(), torch.tensor(trl_metrics["reward_std"][-1]).double()
    )


# --------------------------------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_matches_trl(dtype: torch.dtype, temperature: float) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 5, 64, generator=gen)).to(dtype)
    index = torch.randint(0, 64, (3, 5), generator=gen)
    expected = trl_selective_log_softmax(logits, index, temperature=temperature)
    torch.testing.assert_close(selective_log_softmax(logits, index, temperature), expected, atol=0, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logprobs_match_trl_fused_lm_head(temperature: float) -> None:
    """Against the chunked LM-head kernel behind TRL's ``_get_per_token_logps_and_entropies`` (CPU path)."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 6, 32, generator=gen, requires_grad=True)
    weight = torch.randn(300, 32, generator=gen, requires_grad=True)
    ids = torch.randint(0, 300, (3, 6), generator=gen)
    trl_logps, *_ = ChunkedLogProbFunction.apply(
        hidden.reshape(-1, 32), weight, None, ids.reshape(-1), temperature, 128, None, 1.0, ("log_probs",)
    )
    ours = completion_logprobs(hidden, weight, ids, chunk_size=5, temperature=temperature)
    torch.testing.assert_close(ours, trl_logps.view(3, 6), atol=1e-5, rtol=1e-5)
    upstream = torch.randn(3, 6, generator=gen)
    trl_grads = torch.autograd.grad((trl_logps.view(3, 6) * upstream).sum(), (hidden, weight))
    our_grads = torch.autograd.grad((ours * upstream).sum(), (hidden, weight))
    for got, expected in zip(our_grads, trl_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
