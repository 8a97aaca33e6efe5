"""Shared-prefix forward for GRPO: each prompt runs once per group, the frozen layers once for all passes.

Two things are shared, both exactly (same values as a full ``model(...)`` forward, tested):

1. **The prompt across the G rollouts of a group.** Prompt tokens never attend to completion tokens, so their
   hidden states and keys/values are the same in all G rows. Each prompt's first ``P - 1`` tokens run once
   (``B`` rows); the *tail* — the last prompt token plus the first ``C - 1`` completion tokens, i.e. exactly
   the positions whose outputs predict the ``C`` completion tokens — runs for all ``N = B * G`` rows and
   attends to its prompt's keys/values. With Stage-B's ~1000-token prompts, G = 8 and 64 new tokens this is
   ``8 * 1000 + 64 * 64`` token positions per layer instead of ``64 * 1064``: about 5.6x fewer.
2. **The frozen first L-K layers across policy, old policy and reference.** LoRA lives only on the last K
   layers, so layers ``0..L-K-1`` compute the same states with adapters on or off: they run once under
   ``no_grad`` and every pass starts from the stored states; only the last K layers run per pass.

Gradients flow through the prompt part of the last K layers too (the tail attends to keys/values computed with
the adapters), so the policy loss is the same function of the LoRA weights as with a full forward.

Example::

    prefix = run_frozen_prefix(model, input_ids, attention_mask, completion_length=C, group_size=G,
                               num_frozen=L - K)
    hidden = run_suffix(model, prefix)                   # (N, C, H) after the norm: predicts the C tokens
    with model.disable_adapter(): ref = run_suffix(model, prefix)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from bbuqc_lightning.models.decoder import language_model, position_ids_from_mask, uses_mrope


@dataclass
class Part:
    """Hidden states of one part (prompts or tails) with its additive mask and rotary embeddings."""

    hidden: torch.Tensor  # (rows, T, H)
    mask: torch.Tensor  # (rows, 1, T, keys) additive
    positions: torch.Tensor  # (rows, T)
    embeddings: tuple[torch.Tensor, torch.Tensor]

    def rows(self, index: slice) -> Part:
        cos, sin = self.embeddings
        return Part(self.hidden[index], self.mask[index], self.positions[index], (cos[index], sin[index]))


@dataclass
class PrefixState:
    """Prompt and tail states after ``start_layer`` layers; ``owner[i]`` is tail row ``i``'s prompt row."""

    prompts: Part  # B unique prompts, their first P - 1 tokens
    tails: Part  # N = B * G rows, the C positions that predict the completion tokens
    owner: torch.Tensor  # (N,) index into the prompt rows
    start_layer: int


@torch.no_grad()
def run_frozen_prefix(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    group_size: int,
    num_frozen: int,
) -> PrefixState:
    """Embed and run layers ``0..num_frozen-1`` without gradients.

    ``input_ids`` / ``attention_mask`` are ``(B * G, P + C)``: left-padded prompt then completion, the G rows
    of a prompt consecutive and identical over the first ``P`` tokens (a :class:`~bbuqc_lightning.grpo.rollout.Rollout`).
    """
    rows, length = input_ids.shape
    split = length - completion_length - 1  # prompt tokens run once per group; the rest is the tail
    if split < 1 or rows % group_size:
        raise ValueError(
            f"need >= 2 prompt tokens and rows divisible by the group size; got {rows} rows of {length} "
            f"tokens, {completion_length} completion tokens, group size {group_size}"
        )
    prompt_ids = input_ids[::group_size, :split]
    prompt_attention = attention_mask[::group_size, :split]
    grouped = input_ids[:, : split + 1].view(rows // group_size, group_size, -1)
    if not torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
        raise ValueError(
            "the rows of a group must share their prompt (rows grouped by prompt, G consecutive)"
        )

    lm = language_model(model)
    positions = position_ids_from_mask(attention_mask)
    prompt_hidden = lm.embed_tokens(prompt_ids)
    tail_hidden = lm.embed_tokens(input_ids[:, split:-1])
    prompt_positions = positions[::group_size, :split]
    prompts = Part(
        prompt_hidden,
        padded_causal_mask(prompt_attention, prompt_hidden.dtype),
        prompt_positions,
        _rotary(lm, prompt_hidden, prompt_positions),
    )
    tail_positions = positions[:, split:-1]
    tails = Part(
        tail_hidden,
        padded_causal_mask(attention_mask[:, :-1], tail_hidden.dtype, first_query=split),
        tail_positions,
        _rotary(lm, tail_hidden, tail_positions),
    )
    owner = torch.arange(rows, device=input_ids.device) // group_size
    return _run_layers(lm, PrefixState(prompts, tails, owner, start_layer=0), stop=num_frozen)


def padded_causal_mask(
    attention_mask: torch.Tensor, dtype: torch.dtype, first_query: int = 0
) -> torch.Tensor:
    """Additive ``(B, 1, T - first_query, T)`` mask: causal, padding keys hidden, every query sees itself.

    Rows are the queries ``first_query..T-1`` (0: the whole square mask; the tails use the last rows only).
    A left-padding query row with every key masked makes CUDA's attention kernels return NaN for it, and
    ``0 * NaN`` then leaks into real rows through the value matmul; letting pads see themselves avoids it.
    """
    length = attention_mask.shape[1]
    keys = torch.arange(length, device=attention_mask.device)
    queries = torch.arange(first_query, length, device=attention_mask.device)
    allowed = (keys[None, :] <= queries[:, None])[None] & attention_mask.bool()[:, None, :]
    allowed |= (keys[None, :] == queries[:, None])[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _rotary(
    lm: nn.Module, hidden: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # Qwen3-VL uses 3 rotary sections (t, h, w); for text they all equal the text position.
    rope_positions = positions[None].expand(3, *positions.shape) if uses_mrope(lm) else positions
    return lm.rotary_emb(hidden, rope_positions)


def run_suffix(model: nn.Module, prefix: PrefixState) -> torch.Tensor:
    """Run the remaining layers (with gradients where trainable) and the final norm: ``(N, C, H)``.

    Row ``i``, position ``t`` is the state that predicts completion token ``t`` of row ``i``.
    """
    lm = language_model(model)
    state = _run_layers(lm, prefix, stop=len(lm.layers))
    return lm.norm(state.tails.hidden)


class _CaptureKV:
    """A stand-in cache for the prompt pass: keeps the layer's keys/values and returns them unchanged."""

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args: object, **kwargs: object):
        self.keys, self.values = keys, values
        return keys, values


class _PromptKV:
    """A stand-in cache for the tail pass: each tail attends to its prompt's keys/values, then its own."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args: object, **kwargs: object):
        return torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)


def _run_layers(lm: nn.Module, state: PrefixState, stop: int) -> PrefixState:
    prompts, tails = state.prompts, state.tails
    for layer in lm.layers[state.start_layer : stop]:
        captured = _CaptureKV()
        prompts = _through(layer, prompts, captured)
        tails = _through(layer, tails, _PromptKV(captured.keys[state.owner], captured.values[state.owner]))
    return PrefixState(prompts, tails, state.owner, stop)


def _through(layer: nn.Module, part: Part, cache: _CaptureKV | _PromptKV) -> Part:
    hidden = layer(
        part.hidden,
        attention_mask=part.mask,
        position_ids=part.positions,
        past_key_values=cache,
        position_embeddings=part.embeddings,
    )
    return replace(part, hidden=hidden)


def select_rows(prefix: PrefixState, rows: slice) -> PrefixState:
    """The prefix state of a micro-batch of tail rows, with only the prompts those rows need."""
    start, stop = rows.start or 0, rows.stop
    first = int(prefix.owner[start])
    last = int(prefix.owner[stop - 1]) + 1
    return PrefixState(
        prefix.prompts.rows(slice(first, last)),
        prefix.tails.rows(slice(start, stop)),
        prefix.owner[start:stop] - first,
        prefix.start_layer,
    )
