"""Shared-prefix forward: the frozen first L-K decoder layers run once for policy *and* reference.

LoRA lives only on the last K layers, so layers ``0..L-K-1`` compute the same hidden states with the
adapters on (policy) or off (reference = the same weights with adapters disabled). We run them once under
``no_grad`` and start both the policy and the reference pass from the stored hidden state, so only the
last K layers run twice. The result equals a full ``model(...)`` forward (tested), text-only inputs.

Example::

    prefix = run_frozen_prefix(model, input_ids, attention_mask, num_frozen=L - K)
    hidden = run_suffix(model, prefix)                   # policy (adapters on), (B, T, H) after the norm
    with model.disable_adapter(): ref = run_suffix(model, prefix)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bbuqc_lightning.models.decoder import language_model, position_ids_from_mask, uses_mrope


@dataclass
class PrefixState:
    """Hidden states after the frozen layers plus what the remaining layers need."""

    hidden: torch.Tensor
    causal_mask: torch.Tensor | None
    text_position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    start_layer: int


@torch.no_grad()
def run_frozen_prefix(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_frozen: int
) -> PrefixState:
    """Embed and run layers ``0..num_frozen-1`` without gradients."""
    lm = language_model(model)
    hidden = lm.embed_tokens(input_ids)
    positions = position_ids_from_mask(attention_mask)
    # Qwen3-VL uses 3 rotary sections (t, h, w); for text they all equal the text position.
    rope_positions = positions[None].expand(3, *positions.shape) if uses_mrope(lm) else positions
    mask = padded_causal_mask(attention_mask, hidden.dtype)
    embeddings = lm.rotary_emb(hidden, rope_positions)
    state = PrefixState(hidden, mask, positions, embeddings, start_layer=0)
    return _run_layers(lm, state, stop=num_frozen)


def padded_causal_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``(B, 1, T, T)`` mask: causal, padding keys hidden, and every query sees at least itself.

    A left-padding query row with every key masked makes CUDA's attention kernels return NaN for it, and
    ``0 * NaN`` then leaks into real rows through the value matmul; letting pads see themselves avoids it.
    """
    length = attention_mask.shape[1]
    device = attention_mask.device
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool, device=device)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def run_suffix(model: nn.Module, prefix: PrefixState) -> torch.Tensor:
    """Run the remaining layers (with gradients where trainable) and the final norm."""
    lm = language_model(model)
    state = _run_layers(lm, prefix, stop=len(lm.layers))
    return lm.norm(state.hidden)


def _run_layers(lm: nn.Module, state: PrefixState, stop: int) -> PrefixState:
    hidden = state.hidden
    for layer in lm.layers[state.start_layer : stop]:
        hidden = layer(
            hidden,
            attention_mask=state.causal_mask,
            position_ids=state.text_position_ids,
            past_key_values=None,
            position_embeddings=state.position_embeddings,
        )
    return PrefixState(hidden, state.causal_mask, state.text_position_ids, state.position_embeddings, stop)


def select_rows(prefix: PrefixState, rows: slice) -> PrefixState:
    """The prefix state of a micro-batch of rows."""
    cos, sin = prefix.position_embeddings
    mask = prefix.causal_mask
    if isinstance(mask, torch.Tensor):
        mask = mask[rows]
    return PrefixState(
        prefix.hidden[rows], mask, prefix.text_position_ids[rows], (cos[rows], sin[rows]), prefix.start_layer
    )
