"""The one generation engine: Stage-A, GRPO rollouts, the training-free runner, eval and distillation.

Stages never call ``model.generate`` themselves; they hand conversations (and images) to
:class:`GenerationEngine`, so every speed-up lands everywhere at once.

What it does beyond a plain ``generate`` call:

1. Left padding through the processor's chat template, so batched greedy output equals batch-1 output.
2. **Prefix sharing** for ``num_return_sequences > 1`` (GRPO's G rollouts, the runner's K samples): each
   prompt is prefilled once and its KV cache is repeated G times, instead of HF's default of expanding
   the prompt G times before the prefill.
3. ``backend="static"`` (the default on CUDA): a static KV cache and a fixed-shape decode step compiled
   into a CUDA graph (:mod:`~bbuqc_lightning.generation.static_decode`); ``backend="hf"`` (the default
   on CPU, where compiling costs more than it saves for tiny models) is HF ``generate``. Both give the
   same greedy tokens (tested).

Example::

    engine = GenerationEngine(bundle.model, bundle.processor)
    outs = engine.generate([[{"role": "user", "content": "你好"}]], SamplingParams(max_new_tokens=8))
    outs[0][0].text
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from bbuqc_lightning.generation.static_decode import StaticDecoder
from bbuqc_lightning.models.decoder import (
    language_model,
    position_ids_from_mask,
    update_rope_deltas,
    uses_mrope,
)


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


@dataclass
class EncodedPrompts:
    """Left-padded prompt tensors (plus vision inputs when images were given)."""

    inputs: dict[str, torch.Tensor]

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]


class GenerationEngine:
    """Batched generation over chat conversations for a Qwen3-VL or Qwen3 model."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        backend: str = "auto",
        compile: bool | None = None,
        prefix_sharing: bool = True,
        enable_thinking: bool = False,
    ) -> None:
        if backend not in ("auto", "hf", "static"):
            raise ValueError(f"generation backend must be auto | hf | static, got {backend!r}")
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.backend = backend
        self.compile = compile
        self.prefix_sharing = prefix_sharing
        self.enable_thinking = enable_thinking
        self.eos_token_ids = self._eos_ids()
        self._static: StaticDecoder | None = None

    # ------------------------------------------------------------------ encoding
    def render(self, conversation: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The chat-template text of one conversation (the exact prompt the model sees)."""
        kwargs = {} if self.tokenizer is not self.processor else {"enable_thinking": self.enable_thinking}
        return self.processor.apply_chat_template(
            list(conversation), tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def encode(
        self, conversations: Sequence[Sequence[dict]], images: Sequence[Sequence[Image.Image]] | None = None
    ) -> EncodedPrompts:
        """Render and tokenise a batch with left padding; images in conversation order."""
        texts = [self.render(conv) for conv in conversations]
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if self._use_static():
            # Prompt lengths in buckets of 64: the compiled decode step then sees few distinct shapes.
            kwargs["pad_to_multiple_of"] = 64
        flat_images = [img for group in images for img in group] if images else []
        if flat_images:
            kwargs["images"] = flat_images
        if self.tokenizer is self.processor:
            self.tokenizer.padding_side = "left"
            enc = self.tokenizer(**kwargs)
        else:
            enc = self.processor(padding_side="left", **kwargs)
        return EncodedPrompts({k: v.to(self.device) for k, v in enc.items()})

    # ---------------------------------------------------------------- generation
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(
        self,
        conversations: Sequence[Sequence[dict]],
        params: SamplingParams,
        images: Sequence[Sequence[Image.Image]] | None = None,
    ) -> list[list[Completion]]:
        """Generate ``params.num_return_sequences`` completions for each conversation."""
        if not conversations:
            return []
        encoded = self.encode(conversations, images)
        sequences = self.generate_ids(encoded, params)
        return self._decode(sequences, encoded.input_ids.shape[1], params.num_return_sequences)

    @torch.no_grad()
    def generate_ids(self, encoded: EncodedPrompts, params: SamplingParams) -> torch.Tensor:
        """Token ids ``(B * G, prompt_len + new)`` with prompts repeated G times, row-major by prompt."""
        was_training = self.model.training
        self.model.eval()
        try:
            if self._use_static():
                return self._static_decoder().generate(
                    encoded.inputs,
                    params.num_return_sequences,
                    params.max_new_tokens,
                    make_sampler(params, self.eos_token_ids),
                    self.eos_token_ids,
                    self.tokenizer.pad_token_id,
                )
            kwargs = self._generate_kwargs(params)
            n = params.num_return_sequences
            if n > 1 and self.prefix_sharing and "pixel_values" not in encoded.inputs:
                return self._generate_shared_prefix(encoded, n, kwargs)
            return self.model.generate(**encoded.inputs, num_return_sequences=n, **kwargs)
        finally:
            self.model.train(was_training)

    def _use_static(self) -> bool:
        return self.backend == "static" or (self.backend == "auto" and self.device.type == "cuda")

    def _static_decoder(self) -> StaticDecoder:
        if self._static is None:
            compile_step = self.compile if self.compile is not None else self.device.type == "cuda"
            self._static = StaticDecoder(self.model, compile=compile_step)
        return self._static

    def _generate_shared_prefix(self, encoded: EncodedPrompts, n: int, kwargs: dict) -> torch.Tensor:
        """Prefill every prompt once, then decode its ``n`` continuations from a repeated KV cache.

        The last prompt token is left out of the prefill: ``generate`` needs at least one uncached token
        to produce the first next-token distribution.
        """
        inputs = encoded.inputs
        cache = DynamicCache(config=self._config())
        prefix = {k: v[:, :-1] for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        # Explicit positions: left-padded rows must be cached at the positions generate() continues from.
        positions = position_ids_from_mask(prefix["attention_mask"])
        prefix["position_ids"] = positions[None].expand(4, -1, -1) if self._mrope() else positions
        update_rope_deltas(self.model, lambda _: None)  # stale offsets of an earlier batch must not be reused
        self.model(
            **prefix, past_key_values=cache, use_cache=True, logits_to_keep=1
        )  # only the cache matters
        cache.batch_repeat_interleave(n)
        update_rope_deltas(self.model, lambda deltas: deltas.repeat_interleave(n, dim=0))
        repeated = {k: v.repeat_interleave(n, dim=0) for k, v in inputs.items()}
        return self.model.generate(**repeated, past_key_values=cache, **kwargs)

    def _mrope(self) -> bool:
        return uses_mrope(language_model(self.model))

    def _config(self) -> Any:
        config = self.model.config
        return getattr(config, "text_config", config)

    def _generate_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "min_new_tokens": params.min_new_tokens,
            "do_sample": params.do_sample,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.eos_token_ids,
        }
        if params.suppress_token_ids:
            # HF's SuppressTokensLogitsProcessor runs isin() over the whole vocabulary every step.
            kwargs["logits_processor"] = LogitsProcessorList([_Suppress(params.suppress_token_ids)])
        if params.do_sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    # ------------------------------------------------------------------ decoding
    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.convert_tokens_to_ids("<|im_end|>"), self.tokenizer.eos_token_id}
        return sorted(i for i in ids if i is not None)

    def _decode(self, sequences: torch.Tensor, prompt_len: int, n: int) -> list[list[Completion]]:
        completions = sequences[:, prompt_len:].tolist()
        results: list[list[Completion]] = [[] for _ in range(len(completions) // n)]
        for row, ids in enumerate(completions):
            ids, truncated = self.strip_completion(ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            results[row // n].append(Completion(row // n, text, ids, truncated))
        return results

    def strip_completion(self, ids: list[int]) -> tuple[list[int], bool]:
        """Cut at the first end-of-sequence token (kept) and drop padding; report truncation."""
        for pos, token in enumerate(ids):
            if token in self.eos_token_ids:
                return ids[: pos + 1], False
        pad = self.tokenizer.pad_token_id
        return [t for t in ids if t != pad], True


def line_break_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Every vocabulary entry that contains a line break (byte-level BPE spells them ``Ċ`` / ``č``)."""
    return tuple(sorted(i for token, i in tokenizer.get_vocab().items() if "Ċ" in token or "č" in token))


class _Suppress(LogitsProcessor):
    """Never generate these tokens (an index fill, not a vocabulary-wide membership test)."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = torch.tensor(list(token_ids), dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill(-1, self.token_ids.to(scores.device), float("-inf"))


def make_sampler(params: SamplingParams, eos_token_ids: Sequence[int]) -> Any:
    """``(logits (N, V) fp32, step) -> tokens (N,)`` with HF's order: temperature, top-k, top-p, sample.

    End-of-sequence tokens are forbidden before ``min_new_tokens``.
    """
    eos = torch.tensor(list(eos_token_ids))
    suppressed = torch.tensor(list(params.suppress_token_ids), dtype=torch.long)

    def sample(logits: torch.Tensor, step: int) -> torch.Tensor:
        if suppressed.numel():
            logits = logits.index_fill(-1, suppressed.to(logits.device), float("-inf"))
        if step < params.min_new_tokens:
            logits = logits.index_fill(-1, eos.to(logits.device), float("-inf"))
        if not params.do_sample:
            return logits.argmax(dim=-1)
        logits = logits / params.temperature
        if params.top_k:
            kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            logits = _top_p(logits, params.top_p)
        return torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(-1)

    return sample


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (HF's TopPLogitsWarper)."""
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
