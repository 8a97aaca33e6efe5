"""``bbuqc_sdpa``: transformers' SDPA attention, with grouped-query decoding that stays grouped when compiled.

Qwen3-VL-4B has 32 query heads over 8 key/value heads. For a one-token decode step with a padding mask,
transformers' ``sdpa`` attention packs the 4 query heads of each key/value head into the query-length axis
(``pack_gqa``) — but not under ``torch.compile``, where it falls back to ``repeat_kv``: every step then copies
the whole KV cache 4x (64 rows x 1152 positions x 36 layers: about 40 GB of memory traffic per decode step, on a
step whose weights and cache are 20 GB). The compiled static decoder is exactly that case, so it registers
this function, which packs in both modes and otherwise calls transformers' ``sdpa`` unchanged (prefill,
training forwards, the vision tower). Same maths: query head ``i`` attends with key/value head ``i // groups``
either way (tested against ``sdpa``).

Registered with transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (same masks as ``sdpa``)::

    use_grouped_decode_attention(model)   # a no-op unless the model runs "sdpa"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from bbuqc_lightning.models.decoder import base_model

NAME = "bbuqc_sdpa"


def grouped_decode_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """One query token with grouped KV heads: attend on the KV heads directly; anything else: ``sdpa``."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, length, dim = query.shape
    if (
        length != 1
        or groups == 1
        or kwargs.get("position_bias") is not None
        or key.shape[1] * groups != heads
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # (B, H, 1, D) -> (B, H / groups, groups, D): the queries of one KV head become its query positions.
    packed = query.reshape(batch, heads // groups, groups, dim)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] != 1:
        attention_mask = attention_mask.reshape(batch, heads // groups, groups, -1)
    out = F.scaled_dot_product_attention(
        packed, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``bbuqc_sdpa`` known to transformers (idempotent)."""
    AttentionInterface.register(NAME, grouped_decode_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_grouped_decode_attention(model: nn.Module) -> None:
    """Switch a model that runs ``sdpa`` to ``bbuqc_sdpa``; any other attention is left as it is."""
    inner = base_model(model)
    if inner.config._attn_implementation == "sdpa":
        register()
        inner.set_attn_implementation(NAME)
