"""What to generate and how to pick tokens: :class:`SamplingParams`, :class:`Completion`, the sampler.

One spelling per setting for every stage (Stage-A, GRPO, eval, the runner, distillation). The sampler
applies HF ``generate``'s order: suppressed tokens, minimum length, temperature, top-k, top-p, sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. Greedy unless ``do_sample``; ``num_return_sequences`` samples per prompt."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_return_sequences: int = 1
    min_new_tokens: int = 0
    suppress_token_ids: tuple[int, ...] = ()  # never generated (e.g. line breaks for one-line summaries)


@dataclass
class Completion:
    """One generated continuation of one prompt."""

    prompt_index: int
    text: str
    token_ids: list[int]
    truncated: bool  # stopped by max_new_tokens rather than by an end-of-sequence token


Sampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_sampler(params: SamplingParams, eos_token_ids: Sequence[int]) -> Sampler:
    """``(logits (N, V) fp32, steps (N,) long) -> tokens (N,)``; ``steps[i]``: tokens row ``i`` already has.

    Rows may be at different steps (continuous batching), so the minimum length applies per row.
    """
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long)
    suppressed = torch.tensor(list(params.suppress_token_ids), dtype=torch.long)

    def sample(logits: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        if suppressed.numel():
            logits = logits.index_fill(-1, suppressed.to(logits.device), float("-inf"))
        if params.min_new_tokens:
            early = (steps < params.min_new_tokens).unsqueeze(1)
            blocked = torch.zeros_like(logits, dtype=torch.bool).index_fill(-1, eos.to(logits.device), True)
            logits = logits.masked_fill(early & blocked, float("-inf"))
        if not params.do_sample:
            return logits.argmax(dim=-1)
        logits = logits / params.temperature
        if params.top_k:
            kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            logits = top_p_filter(logits, params.top_p)
        return torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(-1)

    return sample


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (HF's TopPLogitsWarper)."""
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def line_break_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Every vocabulary entry that contains a line break (byte-level BPE spells them ``Ċ`` / ``č``)."""
    return tuple(sorted(i for token, i in tokenizer.get_vocab().items() if "Ċ" in token or "č" in token))
