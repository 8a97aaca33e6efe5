"""GRPO rollouts: G sampled completions per prompt through the shared engine, scored by reward functions.

A :class:`Rollout` holds everything the loss needs as tensors, with the G completions of a prompt in
consecutive rows, so a group never straddles micro-batches' bookkeeping or ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from bbuqc_lightning.generation.engine import GenerationEngine, SamplingParams
from bbuqc_lightning.generation.protocol import naming_prompts
from bbuqc_lightning.stage_b.rewards import RewardFunc
from bbuqc_lightning.stage_b.sample import StageBSample, reward_columns


@dataclass
class Rollout:
    """``N = B * G`` completions of ``B`` prompts (rows grouped by prompt)."""

    input_ids: torch.Tensor  # (N, P + C) prompt (left padded) + completion (right padded)
    attention_mask: torch.Tensor  # (N, P + C)
    completion_ids: torch.Tensor  # (N, C)
    completion_mask: torch.Tensor  # (N, C) 1 up to and including the first EOS
    truncated: torch.Tensor  # (N,) bool: hit max_new_tokens without EOS
    texts: list[str]
    rewards_per_func: torch.Tensor  # (N, F)
    samples: list[StageBSample]  # the prompt's sample, repeated per completion

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1] - self.completion_ids.shape[1]


def generate_rollout(
    engine: GenerationEngine,
    samples: Sequence[StageBSample],
    params: SamplingParams,
    reward_funcs: Mapping[str, RewardFunc],
) -> Rollout:
    """Sample ``params.num_return_sequences`` completions per sample and score them."""
    encoded = engine.encode([s.messages for s in samples])
    with naming_prompts([s.ticket_key for s in samples]):
        sequences = engine.generate_ids(encoded, params)
    prompt_len = encoded.input_ids.shape[1]
    completion_ids = sequences[:, prompt_len:]
    completion_mask, truncated = completion_masks(completion_ids, engine.eos_token_ids)
    g = params.num_return_sequences
    prompt_mask = encoded.inputs["attention_mask"].repeat_interleave(g, dim=0)
    texts = [
        engine.tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
        for ids, mask in zip(completion_ids, completion_mask, strict=True)
    ]
    repeated = [s for s in samples for _ in range(g)]
    rewards = score(reward_funcs, texts, repeated).to(completion_ids.device)
    return Rollout(
        input_ids=sequences,
        attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        truncated=truncated,
        texts=texts,
        rewards_per_func=rewards,
        samples=repeated,
    )


def completion_masks(
    completion_ids: torch.Tensor, eos_token_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask up to and including the first EOS, as TRL; rows without EOS are truncated."""
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_token_ids), device=completion_ids.device))
    length = completion_ids.shape[1]
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(
        has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, length, dtype=torch.long)
    )
    positions = torch.arange(length, device=completion_ids.device).expand_as(completion_ids)
    mask = (positions <= first_eos.unsqueeze(1)).int()
    return mask, ~has_eos


def score(
    reward_funcs: Mapping[str, RewardFunc], texts: list[str], samples: Sequence[StageBSample]
) -> torch.Tensor:
    """``(N, F)`` rewards; dataset columns reach each function as keyword lists (TRL's convention)."""
    columns = reward_columns(samples)
    prompts = [s.messages for s in samples]
    values = [
        [float("nan") if v is None else float(v) for v in func(completions=texts, prompts=prompts, **columns)]
        for func in reward_funcs.values()
    ]
    return torch.tensor(values, dtype=torch.float32).T.reshape(len(texts), len(reward_funcs))
