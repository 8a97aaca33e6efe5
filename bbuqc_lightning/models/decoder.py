"""Where the parts of a (possibly peft-wrapped) Qwen3-VL / Qwen3 decoder live.

Used by the shared-prefix GRPO forward and the generation engine's decode step, which call the decoder stack
directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import PeftModel
from torch import nn


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (adapters stay injected in its layers)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``) of a VL or text model."""
    inner = base_model(model).model
    return getattr(inner, "language_model", inner)


def output_embedding(model: nn.Module) -> nn.Module:
    """The ``lm_head`` (tied to the input embedding in the 2B/4B models)."""
    return base_model(model).lm_head


def uses_mrope(decoder: nn.Module) -> bool:
    """Qwen3-VL's text decoder takes 3-section M-RoPE positions; Qwen3's takes plain positions."""
    parameters = getattr(decoder.config, "rope_parameters", None) or {}
    return "mrope_section" in parameters


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Text positions that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _modules_with_rope_deltas(model: nn.Module) -> list[nn.Module]:
    # vars(): the outer Qwen3-VL model exposes the inner tensor through a property; touch it only once.
    return [m for m in model.modules() if "rope_deltas" in vars(m)]


def rope_deltas(model: nn.Module) -> torch.Tensor | None:
    """The per-row M-RoPE offsets Qwen3-VL cached at its last prefill (None for text prompts / Qwen3)."""
    for module in _modules_with_rope_deltas(model):
        if isinstance(module.rope_deltas, torch.Tensor):
            return module.rope_deltas
    return None


def update_rope_deltas(model: nn.Module, update: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
    """Replace the cached M-RoPE offsets (``lambda _: None`` clears stale ones before a new prefill)."""
    for module in _modules_with_rope_deltas(model):
        deltas = module.rope_deltas
        module.rope_deltas = None if deltas is None else update(deltas)
