"""Static-cache decoding: one prefill per prompt, a fixed-shape decode step, CUDA graphs on GPU.

HF ``generate`` spends most of a decode step in Python (logits processors, stopping criteria, cache
bookkeeping) once the model is small relative to the GPU. Here the decode step is one function of
fixed-shape tensors — ``(tokens, positions, attention_mask) -> logits`` over a pre-allocated
:class:`~transformers.StaticCache` — so ``torch.compile(mode="reduce-overhead")`` can capture it as a CUDA
graph, and sampling is a few tensor ops outside it. Attention runs ``bbuqc_sdpa``
(:mod:`~bbuqc_lightning.models.attention`), which keeps grouped-query decoding grouped under compile.

Prefix sharing: the prompts are prefilled once at batch ``B``; the cache is then repeated to ``B * n``
rows for ``n`` samples per prompt. Positions follow Qwen3-VL's M-RoPE: the decode position of a row is
``#real prompt tokens + t + rope_delta`` (the delta accounts for image-token compression).

Greedy output equals HF ``generate`` (tested on the tiny model, text and image prompts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, StaticCache

from bbuqc_lightning.models.attention import use_grouped_decode_attention
from bbuqc_lightning.models.decoder import (
    language_model,
    output_embedding,
    position_ids_from_mask,
    rope_deltas,
    update_rope_deltas,
    uses_mrope,
)

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class StaticDecoder:
    """Generate with a static KV cache; ``compile=True`` (CUDA) captures the decode step as a graph."""

    def __init__(self, model: nn.Module, compile: bool = False) -> None:
        self.model = model
        self.compile = compile
        # Compiled sdpa would copy the KV cache per step for grouped-query heads (models/attention.py).
        use_grouped_decode_attention(model)
        # One cache + step per (rows, cache length), reused across calls: a compiled step keeps its graph
        # only while the cache tensors it closes over stay the same objects.
        self._slots: dict[tuple[int, int], tuple[StaticCache, StepFn]] = {}

    @torch.no_grad()
    def generate(
        self,
        inputs: dict[str, torch.Tensor],
        num_samples: int,
        max_new_tokens: int,
        sample: Callable[[torch.Tensor, int], torch.Tensor],
        eos_token_ids: list[int],
        pad_token_id: int,
    ) -> torch.Tensor:
        """``(B * n, P + max_new_tokens)`` ids, rows grouped by prompt; padding after each row's EOS.

        ``sample(logits (N, V) fp32, step) -> (N,)`` picks the next tokens (greedy / sampling / min length).
        """
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        batch, prompt_len = input_ids.shape
        rows = batch * num_samples
        cache, step_fn = self._slot(rows, prompt_len + max_new_tokens)
        logits, offsets = self._prefill(inputs, cache, num_samples)
        offsets = offsets.repeat_interleave(num_samples, dim=0)
        mask = torch.zeros(
            rows, prompt_len + max_new_tokens, dtype=attention_mask.dtype, device=input_ids.device
        )
        mask[:, :prompt_len] = attention_mask.repeat_interleave(num_samples, dim=0)
        logits = logits.repeat_interleave(num_samples, dim=0)
        eos = torch.tensor(eos_token_ids, device=input_ids.device)
        out = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=input_ids.device)
        finished = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
        for t in range(max_new_tokens):
            tokens = sample(logits, t)
            out[:, t] = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
            finished |= torch.isin(tokens, eos)
            if t == max_new_tokens - 1 or (t % 8 == 7 and bool(finished.all())):
                break
            mask[:, prompt_len + t] = 1
            positions = (offsets + t).view(rows, 1)
            if self.compile:  # the previous step's logits are consumed: the graph may reuse their memory
                torch.compiler.cudagraph_mark_step_begin()
            logits = step_fn(out[:, t : t + 1].clone(), positions, mask).clone()
        return torch.cat([input_ids.repeat_interleave(num_samples, dim=0), out], dim=1)

    def _slot(self, rows: int, length: int) -> tuple[StaticCache, StepFn]:
        key = (rows, length)
        if key not in self._slots:
            cache = StaticCache(config=self.model.config, max_cache_len=length)
            self._slots[key] = (cache, self._step_fn(cache))
        return self._slots[key]

    def _prefill(
        self, inputs: dict[str, torch.Tensor], cache: StaticCache, num_samples: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompts once; return last-position logits and each row's first decode position.

        The first new token sits at ``#real prompt tokens + rope_delta``: left padding does not count,
        and Qwen3-VL's delta accounts for image tokens sharing M-RoPE positions (0 for text).
        """
        attention_mask = inputs["attention_mask"]
        update_rope_deltas(self.model, lambda _: None)
        prefill_cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        kwargs: dict[str, Any] = {"past_key_values": prefill_cache, "use_cache": True, "logits_to_keep": 1}
        if "pixel_values" not in inputs:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        out = self.model(**inputs, **kwargs)
        _load_static(cache, prefill_cache, num_samples)
        valid = attention_mask.sum(dim=1).long()
        deltas = rope_deltas(self.model)
        if deltas is not None:
            valid = valid + deltas.view(-1).to(valid.device).long()
        return out.logits[:, -1].float(), valid

    def _step_fn(self, cache: StaticCache) -> StepFn:
        lm = language_model(self.model)
        head = output_embedding(self.model)
        mrope = uses_mrope(lm)

        def step(tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            pos = positions[None].expand(4, -1, -1) if mrope else positions
            hidden = lm(
                input_ids=tokens, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
            ).last_hidden_state
            return head(hidden[:, -1]).float()

        if not self.compile:
            return step
        # One compiled graph per slot: GRPO and Stage-A batches repeat the same shapes.
        return torch.compile(step, mode="reduce-overhead", fullgraph=False, dynamic=False)


def _load_static(cache: StaticCache, prefill: DynamicCache, n: int) -> None:
    """Copy the prefilled keys/values into the static cache, each prompt's rows repeated ``n`` times.

    Copies happen in place, so the static tensors keep their addresses (CUDA graphs depend on it).
    """
    for static, dynamic in zip(cache.layers, prefill.layers, strict=True):
        keys = dynamic.keys.repeat_interleave(n, dim=0)
        values = dynamic.values.repeat_interleave(n, dim=0)
        if not static.is_initialized:
            static.lazy_initialization(keys, values)
        length = keys.shape[2]
        static.keys.zero_()
        static.values.zero_()
        static.keys[:, :, :length].copy_(keys)
        static.values[:, :, :length].copy_(values)
        static.cumulative_length.fill_(length)
