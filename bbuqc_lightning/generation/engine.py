"""The one generation engine: Stage-A, GRPO rollouts and validation, eval, the runner and distillation.

Stages never call ``model.generate``; they receive a :class:`GenerationEngine` built from the
``conf/generation/`` group (``_partial_``, like the optimizer) and hand it conversations (and images)::

    engine = GenerationEngine(bundle.model, bundle.processor)          # or instantiate(cfg.generation)(...)
    outs = engine.generate([[{"role": "user", "content": "你好"}]], SamplingParams(max_new_tokens=8))
    outs[0][0].text

``backend="pool"`` (what ``auto`` picks, CPU and GPU alike) is continuous batching over a KV pool of fixed
size (:mod:`~bbuqc_lightning.generation.scheduler`, :mod:`~bbuqc_lightning.generation.kv_pool`):

1. **fixed memory**: the pool is allocated once, at the first call, from ``kv_memory_gb`` or
   ``kv_memory_fraction`` of the free GPU memory; it never grows with prompt lengths, rows or image sizes.
   A prompt over ``max_prompt_len`` is an error naming it; more prompts than slots wait in a queue;
2. **no per-shape compiles**: the decode step is captured as a CUDA graph once per bucket (slots in flight
   rounded to a power of two, the longest prompt rounded to ``length_buckets``), not per prompt length;
   ``compile_layers=True`` also fuses each decoder layer's element-wise work with ``torch.compile``, compiled
   once for all layers and buckets (:mod:`~bbuqc_lightning.generation.compiled_layers`);
3. **continuous batching**: a prompt whose samples have all ended frees its slot for a waiting prompt;
4. **shared prompts**: the G samples of a prompt read one copy of its keys/values, once per step
   (:mod:`~bbuqc_lightning.generation.pool_attention`);
5. **chunked prefill** (``prefill_chunk_tokens``, off by default): prompts enter the pool a chunk at a time in
   the same forward as the decode rows, instead of stopping them for whole-prompt prefills
   (:mod:`~bbuqc_lightning.generation.chunked_prefill`);
6. **overlapped prefill** (``overlap_prefill``, off by default; not with chunked prefill): once rows are running,
   whole-prompt prefills run on a side CUDA stream, from a worker thread, beside the decode steps instead of
   stopping them; the prompts' rows start when their prefill is done (:mod:`~bbuqc_lightning.generation.overlap`).
   ``overlap_decode_priority`` also runs the decode steps on a high-priority CUDA stream, so their kernels take
   the SMs the prefill frees before the prefill's next ones do; ``overlap_switch_interval`` shortens the
   interpreter's thread switch interval during a call, so the caller's thread waits less for the GIL while the
   worker launches a prefill.

``backend="hf"`` is HF ``generate`` (with each prompt prefilled once for its G samples), the reference the
pool is tested against: both give the same greedy tokens.

Encoding a prompt (chat template, tokenizer, image processor: ~15 ms a photo on one CPU core) can move off the
generation loop: a DataLoader worker calls :class:`PromptEncoder` (picklable) and the stage passes the result as
``generate(..., encoded=...)``; Stage-A does so. :attr:`GenerationEngine.stats` says where the time went.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from bbuqc_lightning.generation.chunked_prefill import Prepared, prepare
from bbuqc_lightning.generation.decode_step import DecodeStep
from bbuqc_lightning.generation.kv_pool import KVPool, PoolLayout, plan_pool
from bbuqc_lightning.generation.pool_attention import use_engine_attention
from bbuqc_lightning.generation.sampling import (
    Completion,
    SamplingParams,
    line_break_token_ids,
    make_sampler,
)
from bbuqc_lightning.generation.scheduler import ContinuousBatcher, Request, check_overlap_settings
from bbuqc_lightning.models.decoder import (
    language_model,
    position_ids_from_mask,
    rope_deltas,
    update_rope_deltas,
    uses_mrope,
)

__all__ = [
    "Ahead",
    "Completion",
    "EncodedPrompts",
    "GenerationEngine",
    "PromptEncoder",
    "SamplingParams",
    "line_break_token_ids",
]

SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
DEFAULT_LENGTH_BUCKETS = (256, 512, 1024, 2048, 3072, 4096, 6144, 8192)

log = logging.getLogger(__name__)


@dataclass
class EncodedPrompts:
    """Left-padded prompt tensors (plus vision inputs when images were given)."""

    inputs: dict[str, torch.Tensor]

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]


@dataclass
class Ahead:
    """The next ``generate`` call's prompts, handed early (pool backend; the HF backend ignores them).

    They wait behind the call's own prompts and take the slots the call's last prompts leave free, so the call does
    not end in a wave of rows waiting for its longest one. The call returns when its own prompts are done; the next
    call, asking for these prompts by the same ``keys`` with the same sampling settings, finds them started or
    done. Stage-A hands each predict batch the next one's prompts (``data.lookahead``).
    """

    encoded: Sequence[dict[str, torch.Tensor]]  # PromptEncoder outputs
    keys: Sequence[Hashable]
    names: Sequence[str] | None = None


class PromptEncoder:
    """One conversation (and its images) -> the processor's tensors for that prompt alone (a batch of one).

    The engine's own encoder, and picklable: a DataLoader worker can run it so the generation loop receives
    ready tensors (``GenerationEngine.generate(..., encoded=...)``)::

        encode = PromptEncoder(bundle.processor)
        inputs = encode([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}], [img])
    """

    def __init__(self, processor: Any, enable_thinking: bool = False, pixel_dtype: str | None = None) -> None:
        """``pixel_dtype`` (e.g. ``"bfloat16"``, the model's dtype): pixel values cast to it here, as the vision
        tower would cast them anyway; half the host memory of the processor's float32 for batches in flight
        between workers and the generation loop (~10 MB instead of ~19 MB a photo at 1024x768)."""
        self.processor = processor
        self.enable_thinking = enable_thinking
        self.pixel_dtype = getattr(torch, pixel_dtype) if pixel_dtype else None

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def render(self, conversation: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The chat-template text of one conversation (the exact prompt the model sees)."""
        kwargs = {} if self.tokenizer is not self.processor else {"enable_thinking": self.enable_thinking}
        return self.processor.apply_chat_template(
            list(conversation), tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def tokenise(self, texts: list[str], images: Sequence[Image.Image] = ()) -> dict[str, torch.Tensor]:
        """Rendered prompts (and their images, in order) -> left-padded tensors."""
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = list(images)
        if self.tokenizer is self.processor:
            self.tokenizer.padding_side = "left"
            return dict(self.tokenizer(**kwargs))
        return dict(self.processor(padding_side="left", **kwargs))

    def __call__(
        self, conversation: Sequence[dict], images: Sequence[Image.Image] = ()
    ) -> dict[str, torch.Tensor]:
        out = self.tokenise([self.render(conversation)], images)
        if self.pixel_dtype is not None and "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self.pixel_dtype)
        return out


class GenerationEngine:
    """Batched generation over chat conversations for a Qwen3-VL or Qwen3 model."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        backend: str = "auto",
        enable_thinking: bool = False,
        max_prompt_len: int = 4096,
        max_new_tokens: int = 512,
        max_rows: int = 64,
        prompt_slots: int | None = None,
        kv_memory_gb: float | None = None,
        kv_memory_fraction: float = 0.3,
        cuda_graphs: bool = True,
        length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
        max_prefill_tokens: int = 16384,
        prefill_chunk_tokens: int | None = None,
        overlap_prefill: bool = False,
        overlap_decode_priority: bool = False,
        overlap_switch_interval: float | None = None,
        prefix_sharing: bool = True,
        compile_layers: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        if backend not in ("auto", "pool", "hf"):
            raise ValueError(f"generation.backend must be auto | pool | hf, got {backend!r}")
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.backend = _resolve_backend(model, backend)
        self.enable_thinking = enable_thinking
        self.pool_settings = {
            "max_prompt_len": max_prompt_len,
            "max_new_tokens": max_new_tokens,
            "max_rows": max_rows,
            "prompt_slots": prompt_slots,
            "kv_memory_gb": kv_memory_gb,
            "kv_memory_fraction": kv_memory_fraction,
        }
        self.cuda_graphs = cuda_graphs
        self.compile_layers = compile_layers
        self.compile_backend = compile_backend
        self.length_buckets = tuple(length_buckets)
        self.max_prefill_tokens = max_prefill_tokens
        if prefill_chunk_tokens is not None and prefill_chunk_tokens < 1:
            raise ValueError(
                f"generation.prefill_chunk_tokens must be >= 1 or null, got {prefill_chunk_tokens}"
            )
        check_overlap_settings(
            overlap_prefill, prefill_chunk_tokens, overlap_decode_priority, overlap_switch_interval
        )
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.overlap_prefill = overlap_prefill
        self.overlap_decode_priority = overlap_decode_priority
        self.overlap_switch_interval = overlap_switch_interval
        self.prefix_sharing = prefix_sharing
        self.encoder = PromptEncoder(processor, enable_thinking)
        self.encode_seconds = 0.0  # rendering and tokenising inside generate (not pre-encoded prompts)
        self.eos_token_ids = self._eos_ids()
        self.decode_step: DecodeStep | None = None
        self._batcher: ContinuousBatcher | None = None
        if self.backend == "pool":
            use_engine_attention(model)
        else:
            ignored = {
                "overlap_prefill": overlap_prefill,
                "prefill_chunk_tokens": prefill_chunk_tokens is not None,
                "compile_layers": compile_layers,
                "cuda_graphs=false": not cuda_graphs,
            }
            if any(ignored.values()):
                log.warning(
                    "generation.backend resolved to hf (HF generate): the pool engine's %s do nothing here",
                    ", ".join(name for name, on in ignored.items() if on),
                )

    # ------------------------------------------------------------------ encoding
    def render(self, conversation: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The chat-template text of one conversation (the exact prompt the model sees)."""
        return self.encoder.render(conversation, add_generation_prompt)

    def encode(
        self, conversations: Sequence[Sequence[dict]], images: Sequence[Sequence[Image.Image]] | None = None
    ) -> EncodedPrompts:
        """Render and tokenise a batch with left padding; images in conversation order."""
        texts = [self.render(conv) for conv in conversations]
        flat_images = [img for group in images for img in group] if images else []
        enc = self.encoder.tokenise(texts, flat_images)
        return EncodedPrompts({k: v.to(self.device) for k, v in enc.items()})

    # ---------------------------------------------------------------- generation
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def layout(self) -> PoolLayout | None:
        """The KV pool's shape once allocated (the first pool call), else None."""
        return None if self.decode_step is None else self.decode_step.pool.layout

    @property
    def stats(self) -> dict[str, float]:
        """Seconds and counts since the engine was built: ``encode_seconds`` (prompts encoded inside
        ``generate``), and for the pool ``prefill_seconds``, ``decode_seconds``, ``decode_steps``,
        ``occupancy`` (running rows / rows a decode step ran), ``captures``, ``capture_seconds`` and ``dropped_ahead``;
        with ``overlap_prefill``, ``overlapped_prefills``, ``overlapped_steps``, ``overlap_wait_seconds`` and
        ``overlap_worker_seconds`` (:class:`~bbuqc_lightning.generation.scheduler.SchedulerStats`)."""
        out: dict[str, float] = {"encode_seconds": self.encode_seconds}
        if self._batcher is not None and self.decode_step is not None:
            out |= self._batcher.stats.as_dict()
            out |= {
                "captures": self.decode_step.captures,
                "capture_seconds": self.decode_step.capture_seconds,
                "dropped_ahead": self._batcher.dropped,  # prompts handed ahead that no later call asked for
            }
        return out

    @torch.no_grad()
    def generate(
        self,
        conversations: Sequence[Sequence[dict]],
        params: SamplingParams,
        images: Sequence[Sequence[Image.Image]] | None = None,
        names: Sequence[str] | None = None,
        encoded: Sequence[dict[str, torch.Tensor]] | None = None,
        keys: Sequence[Hashable] | None = None,
        ahead: Ahead | None = None,
    ) -> list[list[Completion]]:
        """``params.num_return_sequences`` completions per conversation; ``names`` label errors (ticket keys).

        ``encoded``: each conversation's :class:`PromptEncoder` output (with its images), made ahead, e.g. in
        DataLoader workers; ``images`` are then not needed and the conversations are not rendered again.
        ``keys`` (unique) name the prompts across calls, and ``ahead`` hands the next call's prompts early
        (:class:`Ahead`): the next call passes them as its own with the same keys.
        """
        if not conversations:
            return []
        if encoded is not None and len(encoded) != len(conversations):
            raise ValueError(
                f"generate: {len(encoded)} encoded prompts for {len(conversations)} conversations"
            )
        if keys is not None and (len(keys) != len(conversations) or len(set(keys)) != len(keys)):
            raise ValueError(
                f"generate: {len(keys)} keys for {len(conversations)} conversations, or repeated"
            )
        if ahead is not None:
            counts = {len(ahead.keys), len(ahead.encoded), len(ahead.names or ahead.keys)}
            if keys is None or len(counts) != 1:
                raise ValueError("generate: ahead needs keys for this call and one key (and name) per prompt")
            if len(set(ahead.keys)) != len(ahead.keys) or not set(ahead.keys).isdisjoint(keys):
                raise ValueError("generate: keys handed ahead repeat, or repeat this call's keys")
        if encoded is None:
            start = time.perf_counter()
            encoded = [
                self.encoder(conv, images[i] if images else ()) for i, conv in enumerate(conversations)
            ]
            self.encode_seconds += time.perf_counter() - start
        if self.backend == "hf":
            batch = EncodedPrompts(
                {k: v.to(self.device) for k, v in collate(encoded, self._pad_id()).items()}
            )
            sequences = self.generate_ids(batch, params)
            width = batch.input_ids.shape[1]
            rows = [self.strip_completion(ids) for ids in sequences[:, width:].tolist()]
        else:
            requests = _requests(encoded, names, keys)
            later = []
            if ahead is not None:  # indices below 0: never this call's
                names_ahead = ahead.names or [str(key) for key in ahead.keys]
                later = _requests(ahead.encoded, names_ahead, ahead.keys, first=-len(ahead.keys))
            signature = None if keys is None else (params, tuple(self.eos_token_ids))
            per_prompt = self._run_pool(requests, params, later, signature)
            rows = [self.strip_completion(ids) for per in per_prompt for ids in per]
        n = params.num_return_sequences
        return [[self._completion(i, *rows[i * n + g]) for g in range(n)] for i in range(len(conversations))]

    @torch.no_grad()
    def generate_ids(self, encoded: EncodedPrompts, params: SamplingParams) -> torch.Tensor:
        """Token ids ``(B * G, P + C)`` with prompts repeated G times, row-major by prompt, pad after EOS."""
        if self.backend == "hf":
            return self._hf_generate(encoded, params)
        if "pixel_values" in encoded.inputs:
            raise ValueError("generate_ids takes text prompts; use generate(conversations, images=...)")
        ids, mask = encoded.inputs["input_ids"], encoded.inputs["attention_mask"]
        real = [ids[i][mask[i].bool()][None] for i in range(ids.shape[0])]
        requests = _requests([{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in real])
        rows = [r for per in self._run_pool(requests, params) for r in per]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        out = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        prompts = ids.repeat_interleave(params.num_return_sequences, dim=0)
        return torch.cat([prompts, out.to(ids.device)], dim=1)

    def _run_pool(
        self,
        requests: list[Request],
        params: SamplingParams,
        ahead: Sequence[Request] = (),
        signature: object = None,
    ) -> list[list[list[int]]]:
        batcher = self._pool_batcher()
        was_training = self.model.training
        self.model.eval()
        try:
            return batcher.run(
                requests,
                params.num_return_sequences,
                params.max_new_tokens,
                make_sampler(params, self.eos_token_ids),
                self.eos_token_ids,
                ahead,
                signature,
            )
        finally:
            self.model.train(was_training)

    def _pool_batcher(self) -> ContinuousBatcher:
        if self._batcher is None:
            dtype = language_model(self.model).embed_tokens.weight.dtype
            device = self.device
            layout = plan_pool(self.model, dtype, device, **self.pool_settings)
            # Plain tensors even when the first call happens under Lightning's inference_mode (validation):
            # a training step writes into them later.
            with torch.inference_mode(False):
                pool = KVPool(layout, dtype, device)
                self.decode_step = DecodeStep(
                    self.model, pool, self.cuda_graphs, self.compile_layers, self.compile_backend
                )
                self._batcher = ContinuousBatcher(
                    self.decode_step,
                    self._prefill,
                    self.length_buckets,
                    self.max_prefill_tokens,
                    self._prepare,
                    self.prefill_chunk_tokens,
                    self.overlap_prefill,
                    self.overlap_decode_priority,
                    self.overlap_switch_interval,
                )
        return self._batcher

    def close(self) -> None:
        """Stop the overlapped prefill's worker thread, if one was started (a later call starts it again)."""
        if self._batcher is not None:
            self._batcher.close()

    def _prefill(
        self, requests: list[Request]
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Run a chunk of prompts once (left padded): last-position logits, first decode positions, keys/values.

        The first new token sits at ``#real prompt tokens + rope_delta``: left padding does not count, and
        Qwen3-VL's delta accounts for image tokens sharing M-RoPE positions (0 for text).
        """
        inputs = {
            k: v.to(self.device) for k, v in collate([r.inputs for r in requests], self._pad_id()).items()
        }
        attention_mask = inputs["attention_mask"]
        update_rope_deltas(self.model, lambda _: None)  # stale offsets of an earlier batch must not be reused
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        kwargs: dict[str, Any] = {"past_key_values": cache, "use_cache": True, "logits_to_keep": 1}
        if "pixel_values" not in inputs:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        out = self.model(**inputs, **kwargs)
        valid = attention_mask.sum(dim=1).long()
        deltas = rope_deltas(self.model)
        if deltas is not None:
            valid = valid + deltas.view(-1).to(valid.device).long()
        return out.logits[:, -1].float(), valid, [(layer.keys, layer.values) for layer in cache.layers]

    def _prepare(self, requests: list[Request]) -> list[Prepared]:
        """Chunked prefill: each prompt's embeddings, positions and DeepStack features (vision tower included)."""
        batch = collate([r.inputs for r in requests], self._pad_id())
        return prepare(self.model, {k: v.to(self.device) for k, v in batch.items()})

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eos_token_ids[0]

    # ---------------------------------------------------------------- HF backend
    def _hf_generate(self, encoded: EncodedPrompts, params: SamplingParams) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            kwargs = self._generate_kwargs(params)
            n = params.num_return_sequences
            if n > 1 and self.prefix_sharing and "pixel_values" not in encoded.inputs:
                return self._generate_shared_prefix(encoded, n, kwargs)
            return self.model.generate(**encoded.inputs, num_return_sequences=n, **kwargs)
        finally:
            self.model.train(was_training)

    def _generate_shared_prefix(self, encoded: EncodedPrompts, n: int, kwargs: dict) -> torch.Tensor:
        """Prefill every prompt once, then decode its ``n`` continuations from a repeated KV cache.

        The last prompt token is left out of the prefill: ``generate`` needs at least one uncached token
        to produce the first next-token distribution.
        """
        inputs = encoded.inputs
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        prefix = {k: v[:, :-1] for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        positions = position_ids_from_mask(prefix["attention_mask"])
        mrope = uses_mrope(language_model(self.model))
        prefix["position_ids"] = positions[None].expand(4, -1, -1) if mrope else positions
        update_rope_deltas(self.model, lambda _: None)
        self.model(**prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(n)
        update_rope_deltas(self.model, lambda deltas: deltas.repeat_interleave(n, dim=0))
        repeated = {k: v.repeat_interleave(n, dim=0) for k, v in inputs.items()}
        return self.model.generate(**repeated, past_key_values=cache, **kwargs)

    def _generate_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "min_new_tokens": params.min_new_tokens,
            "do_sample": params.do_sample,
            "pad_token_id": self._pad_id(),
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

    def _completion(self, index: int, ids: list[int], truncated: bool) -> Completion:
        return Completion(index, self.tokenizer.decode(ids, skip_special_tokens=True), ids, truncated)

    def strip_completion(self, ids: list[int]) -> tuple[list[int], bool]:
        """Cut at the first end-of-sequence token (kept) and drop padding; report truncation."""
        for pos, token in enumerate(ids):
            if token in self.eos_token_ids:
                return ids[: pos + 1], False
        pad = self.tokenizer.pad_token_id
        return [t for t in ids if t != pad], True


def collate(inputs: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch single-prompt processor outputs: sequences left padded, vision tensors concatenated in order."""
    width = max(int(x["input_ids"].shape[1]) for x in inputs)
    out: dict[str, torch.Tensor] = {}
    keys = dict.fromkeys(key for x in inputs for key in x)  # text prompts beside photo prompts have no pixels
    for key in keys:
        parts = [x[key] for x in inputs if key in x]
        if key in SEQUENCE_KEYS:
            if len(parts) < len(inputs):
                raise ValueError(f"generate: {key} is missing from some encoded prompts")
            fill = pad_id if key == "input_ids" else 0
            padded = torch.full((len(parts), width), fill, dtype=parts[0].dtype)
            for i, part in enumerate(parts):
                padded[i, width - part.shape[1] :] = part[0]
            out[key] = padded
        else:
            out[key] = torch.cat(parts, dim=0)
    return out


def _requests(
    encoded: Sequence[dict[str, torch.Tensor]],
    names: Sequence[str] | None = None,
    keys: Sequence[Hashable] | None = None,
    first: int = 0,
) -> list[Request]:
    """The scheduler's requests for encoded prompts, indexed from ``first`` (named ``#<index>`` by default)."""
    return [
        Request(
            first + i,
            inputs,
            int(inputs["input_ids"].shape[1]),
            names[i] if names else f"#{first + i}",
            keys[i] if keys is not None else None,
        )
        for i, inputs in enumerate(encoded)
    ]


def _resolve_backend(model: torch.nn.Module, backend: str) -> str:
    if backend != "auto":
        return backend
    devices = set((getattr(model, "hf_device_map", None) or {}).values())
    return "hf" if len(devices) > 1 else "pool"  # a model spread over GPUs (device_map: auto): HF generate


class _Suppress(LogitsProcessor):
    """Never generate these tokens (an index fill, not a vocabulary-wide membership test)."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = torch.tensor(list(token_ids), dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill(-1, self.token_ids.to(scores.device), float("-inf"))
