"""Chunked prefill: a prompt's tokens enter the pool a chunk at a time, inside the decode steps.

With ``generation.prefill_chunk_tokens=N`` the engine no longer stops the running rows to prefill whole prompts.
An admitted prompt is *prepared* once (its photos through the vision tower, its input embeddings, M-RoPE
positions and DeepStack features, exactly as transformers computes them), and then every step runs up to N of
the waiting prompt tokens **in the same forward as the decode rows** (one pass over the weights for both), as
vLLM's and SGLang's chunked prefill do. A prompt whose last token has run starts its G sample rows at the next
step. The decode-only steps keep their CUDA graphs; a step carrying prompt tokens runs eagerly (its shape varies).

Why our own code: transformers has no forward that mixes prompt chunks with single-token decode rows over one
cache, and the kept kernels that do (vLLM's, FlashInfer's ragged prefill) are not part of this project's PyTorch
install (:mod:`~bbuqc_lightning.generation.pool_attention` says why). The decoder layers stay transformers'; only
the attention routes each token (:class:`~bbuqc_lightning.generation.pool_attention.MixedBatch`), and what a
prompt needs before the layers is taken from transformers' own forward (:func:`prepare`), not rebuilt.

Example::

    prepared = prepare(model, collate(inputs, pad_id))  # prompts' processor outputs, left padded
    segment = prepared[0].segment(slot=3, n=512)        # the next 512 tokens of the first, for the next step
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bbuqc_lightning.models.decoder import base_model, language_model, update_rope_deltas


@dataclass
class Prepared:
    """What the decoder layers need of one prompt: ``embeds (L, H)``, ``positions (3, L)`` (M-RoPE; text
    positions repeated for text models), the visual positions ``visual (V,)`` (CPU) with their DeepStack
    features ``deepstack[i] (V, H)`` added after layer ``i``, and how many tokens have run (``done``)."""

    embeds: torch.Tensor
    positions: torch.Tensor
    first_position: int  # the first generated token's: one past the prompt's largest (images share positions)
    visual: torch.Tensor | None = None
    deepstack: list[torch.Tensor] = field(default_factory=list)
    done: int = 0

    @property
    def length(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def remaining(self) -> int:
        return self.length - self.done

    def segment(self, slot: int, n: int) -> Segment:
        """The next ``n`` tokens (at most what remains), marked as run."""
        start, end = self.done, min(self.done + n, self.length)
        self.done = end
        local, features = None, []
        if self.visual is not None and self.deepstack:
            lo, hi = (int(torch.searchsorted(self.visual, x)) for x in (start, end))
            if hi > lo:
                local = self.visual[lo:hi] - start
                features = [f[lo:hi] for f in self.deepstack]
        return Segment(
            slot,
            start,
            self.embeds[start:end],
            self.positions[:, start:end],
            local,
            features,
            end == self.length,
        )


@dataclass
class Segment:
    """A run of one prompt's tokens in a step: positions ``start..start+n-1`` of the prompt in ``slot``."""

    slot: int
    start: int
    embeds: torch.Tensor  # (n, H)
    positions: torch.Tensor  # (3, n)
    visual: torch.Tensor | None  # (v,) positions within the segment that get DeepStack features (CPU)
    deepstack: list[torch.Tensor]  # per DeepStack layer (v, H)
    last: bool  # the prompt's final token is in this segment: its logits give the first sample

    @property
    def n(self) -> int:
        return int(self.embeds.shape[0])


class _Captured(Exception):
    """Stops the forward once the decoder's inputs are known."""


def prepare(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[Prepared]:
    """Run transformers' forward up to the decoder layers on a left-padded ``batch`` of prompts (the engine's
    ``collate``) and keep, per prompt, what it hands them: the merged text/image embeddings, the positions and the
    DeepStack features. The vision tower runs here, once for the batch; the decoder's ``forward`` is stopped
    before its first layer."""
    decoder = language_model(model)
    captured: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        captured.update(kwargs)
        raise _Captured

    handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
    update_rope_deltas(model, lambda _: None)  # stale offsets of an earlier batch must not be reused
    try:
        base_model(model)(**batch, use_cache=False, logits_to_keep=1)
    except _Captured:
        pass
    else:  # pragma: no cover - transformers always reaches its decoder
        raise RuntimeError("chunked prefill: the model's forward did not reach its decoder layers")
    finally:
        handle.remove()
    return _split(decoder, captured, batch["attention_mask"])


def _split(decoder: nn.Module, captured: dict[str, Any], attention_mask: torch.Tensor) -> list[Prepared]:
    """Per prompt (row ``b``, its last ``L_b`` positions: left padding): embeddings, positions, DeepStack."""
    embeds = captured.get("inputs_embeds")
    if embeds is None:  # a text model's decoder embeds its ids itself
        embeds = decoder.embed_tokens(captured["input_ids"])
    width = embeds.shape[1]
    lengths = attention_mask.sum(dim=1).tolist()
    positions = captured.get("position_ids")
    if positions is not None:  # (3, B, W), or (4, B, W) with the text positions first: the M-RoPE three
        positions = positions.reshape(-1, embeds.shape[0], width)[-3:]
    mask, deepstack = captured.get("visual_pos_masks"), captured.get("deepstack_visual_embeds")
    counts = [0] * len(lengths)
    if mask is not None and deepstack:
        counts = mask.sum(dim=1).tolist()
    ropes, visuals, first = [], [], 0
    for row, length in enumerate(lengths):
        real = slice(width - length, width)
        if positions is None:  # text prompts: plain positions (the same three for M-RoPE)
            ropes.append(torch.arange(length, device=embeds.device)[None].expand(3, -1))
        else:
            ropes.append(positions[:, row, real])
        visual, features = None, []
        if counts[row]:
            visual = mask[row, real].nonzero().reshape(-1).cpu()
            features = [f[first : first + counts[row]] for f in deepstack]
            first += counts[row]
        visuals.append((visual, features))
    # one past each prompt's largest position (a photo's tokens share positions): one host sync for the batch
    firsts = (torch.stack([r.amax() for r in ropes]) + 1).tolist()
    return [
        Prepared(embeds[row, width - length :], ropes[row], int(firsts[row]), *visuals[row])
        for row, length in enumerate(lengths)
    ]
