"""Decode attention over the KV pool: each prompt's keys/values read once for all its samples.

A decode step has one query token per row. Row ``r = slot * G + g`` is sample ``g`` of the prompt in
``slot``; its keys are the prompt's (in the prompt slot, shared by the G rows) followed by its own generated
tokens (its decode row). The attention is computed in two parts and merged exactly, as FlashInfer's cascade
attention does for shared prefixes:

1. prompt part: the queries of a slot's G rows are stacked (``G x query heads per KV head`` query vectors per
   KV head) against the slot's prompt keys, one batched matrix product per layer: the prompt is read once per
   group, not once per row;
2. decode part: each row's query against its own generated keys;
3. one softmax over both parts (shared running maximum and sum), then the two value products added.

Plain PyTorch matrix products (cuBLAS on GPU, scores accumulated in fp32) rather than a paged-attention
kernel: FlashInfer and flash-attn are not part of the PyTorch install this project pins (both need builds
against the local CUDA toolkit), and FlexAttention recompiles per shape. Slots are contiguous, so a slice of
the pool is all the kernel needs; the CPU takes the same code path, so CI checks the same maths.

The function is registered with transformers' ``AttentionInterface`` as ``bbuqc_engine``: when the layer's
``attention_mask`` is a :class:`DecodeBatch` (only the engine's decode step passes one) it runs the pool
attention, and a :class:`MixedBatch` (a step carrying prompt chunks, :mod:`~bbuqc_lightning.generation.chunked_prefill`)
adds each chunk's causal attention over its slot; any other call is transformers' ``sdpa`` unchanged (training
forwards, prefill, the vision tower).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from bbuqc_lightning.generation.kv_pool import KVPool
from bbuqc_lightning.models.decoder import base_model

NAME = "bbuqc_engine"


@dataclass
class DecodeBatch:
    """The rows of one decode step: ``slots`` prompt slots x ``group`` samples, buckets of the pool to read.

    Also the step's stand-in cache: each layer's :meth:`update` writes the new token's key/value into the
    row's decode position ``steps[r]``.
    """

    pool: KVPool
    slots: int
    group: int
    prompt_bucket: int  # prompt positions read per slot (>= the longest prompt in flight)
    new_bucket: int  # decode positions read per row (>= the longest completion so far)
    steps: torch.Tensor  # (rows,) decode position of the current token
    # additive masks in the pool's dtype (no cast in each layer): 0 where a key is read, a large negative elsewhere
    prompt_bias: torch.Tensor  # (slots, 1, 1, prompt_bucket)
    decode_bias: torch.Tensor  # (rows, 1, 1, new_bucket)
    row_index: torch.Tensor | None = None  # arange(rows), made once a step rather than once a layer

    @property
    def rows(self) -> int:
        return self.slots * self.group

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.row_index if self.row_index is not None else torch.arange(self.rows, device=keys.device)
        dtype = self.pool.dtype
        self.pool.decode_keys[layer_idx][rows, :, self.steps] = keys[:, :, 0].to(dtype)
        self.pool.decode_values[layer_idx][rows, :, self.steps] = values[:, :, 0].to(dtype)
        return keys, values


@dataclass
class MixedBatch:
    """A step that carries prompt tokens (chunked prefill) beside the decode rows, as one sequence of
    ``rows + sum(n)`` tokens: first the decode rows' tokens (``decode``, None when no row runs), then each
    segment's ``n`` prompt tokens, which go to positions ``start..start+n-1`` of their prompt slot and attend
    causally to that slot (the earlier chunks are already there). Also the step's stand-in cache."""

    pool: KVPool
    decode: DecodeBatch | None
    segments: list[tuple[int, int, int]]  # (slot, start, n)
    # per segment, its causal mask (1, 1, per_kv * n, start + n) in the pool's dtype, made once a step
    # (:func:`segment_bias`), not once a layer
    biases: list[torch.Tensor]

    @property
    def rows(self) -> int:
        return 0 if self.decode is None else self.decode.rows

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys (1, kv_heads, T, D)``: the decode rows' into their decode positions, the segments' into
        their slots."""
        rows, dtype = self.rows, self.pool.dtype
        if self.decode is not None:
            self.decode.update(
                keys[0, :, :rows].transpose(0, 1)[:, :, None],
                values[0, :, :rows].transpose(0, 1)[:, :, None],
                layer_idx,
            )
        offset = rows
        for slot, start, n in self.segments:
            part = slice(offset, offset + n)
            self.pool.prompt_keys[layer_idx, slot, :, start : start + n] = keys[0, :, part].to(dtype)
            self.pool.prompt_values[layer_idx, slot, :, start : start + n] = values[0, :, part].to(dtype)
            offset += n
        return keys, values


def mixed_attention(layer_idx: int, query: torch.Tensor, batch: MixedBatch, scaling: float) -> torch.Tensor:
    """``query (1, heads, T, D)`` -> ``(1, T, heads, D)``: the decode rows through :func:`pool_attention`, each
    segment through one causal attention over its slot's first ``start + n`` keys, read once per KV head for all
    the query heads that share it (stacked, as the decode step stacks a prompt's samples)."""
    rows, heads, dim = batch.rows, query.shape[1], query.shape[-1]
    parts = []
    if batch.decode is not None:
        decode_q = query[0, :, :rows].transpose(0, 1).contiguous()[:, :, None]  # (rows, heads, 1, D)
        parts.append(pool_attention(layer_idx, decode_q, batch.decode, scaling).reshape(1, rows, heads, dim))
    pool, offset = batch.pool, rows
    kv_heads = pool.layout.kv_heads
    per_kv = heads // kv_heads
    for (slot, start, n), bias in zip(batch.segments, batch.biases, strict=True):
        keys = start + n
        # (1, heads, n, D) -> (1, kv_heads, per_kv * n, D): equal head counts for the memory-efficient kernel
        q = query[0, :, offset : offset + n].to(pool.dtype).reshape(1, kv_heads, per_kv * n, dim)
        k = pool.prompt_keys[layer_idx, slot : slot + 1, :, :keys]
        v = pool.prompt_values[layer_idx, slot : slot + 1, :, :keys]
        # an explicit kernel: cuDNN (when preferred, model.cudnn_attention) would plan again for every new
        # (n, start + n), and flash takes no mask
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scaling)
        parts.append(out.reshape(heads, n, dim).transpose(0, 1)[None].to(query.dtype))
        offset += n
    return torch.cat(parts, dim=1)


MASKED = -1e30  # finite: a row with every key masked (a free slot) stays finite, so no NaN reaches the pool


def additive_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask -> the same shape, additive, in ``dtype`` (the pool's: the attention kernel takes it as it
    is, no cast in every layer): 0 where allowed, a huge negative elsewhere (fp16: its minimum)."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill(~allowed, max(MASKED, torch.finfo(dtype).min))


def segment_bias(start: int, n: int, per_kv: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The causal mask of a segment's ``n`` queries (each repeated for the ``per_kv`` query heads stacked on a KV
    head) over its slot's first ``start + n`` keys: ``(1, 1, per_kv * n, start + n)``, additive
    (:func:`additive_bias`)."""
    keys = start + n
    allowed = torch.arange(keys, device=device)[None] <= torch.arange(start, keys, device=device)[:, None]
    return additive_bias(allowed, dtype).repeat(per_kv, 1)[None, None]


def pool_attention(layer_idx: int, query: torch.Tensor, batch: DecodeBatch, scaling: float) -> torch.Tensor:
    """``query (rows, heads, 1, D)`` -> ``(rows, 1, heads, D)`` attending to prompt slot + own decode row."""
    rows, heads, _, dim = query.shape
    pool, slots, group = batch.pool, batch.slots, batch.group
    kv_heads = pool.layout.kv_heads
    per_kv = heads // kv_heads
    prompt_k = pool.prompt_keys[layer_idx, :slots, :, : batch.prompt_bucket]
    prompt_v = pool.prompt_values[layer_idx, :slots, :, : batch.prompt_bucket]
    decode_k = pool.decode_keys[layer_idx, :rows, :, : batch.new_bucket]
    decode_v = pool.decode_values[layer_idx, :rows, :, : batch.new_bucket]
    # (rows, H, D) -> (slots, kv_heads, group * per_kv, D): a slot's samples share its prompt keys.
    q = query.view(slots, group, kv_heads, per_kv, dim).transpose(1, 2).reshape(slots, kv_heads, -1, dim)
    q = q.to(pool.dtype)
    qd = query.view(rows, kv_heads, per_kv, dim).to(pool.dtype)
    if _fused_ok(q):
        try:
            o1, l1 = _attend(q, prompt_k, prompt_v, batch.prompt_bias, scaling)
            o2, l2 = _attend(qd, decode_k, decode_v, batch.decode_bias, scaling)
        except RuntimeError:  # shapes the kernel refuses (alignment): the matrix-product path below
            global _FUSED
            _FUSED = False
        else:
            return merge_parts(o1, l1, o2, l2, slots, group).reshape(rows, 1, heads, dim).to(query.dtype)
    s1 = _scores(q, prompt_k) * scaling + batch.prompt_bias  # (slots, kv, group*per_kv, Lb)
    s2 = _scores(qd, decode_k) * scaling + batch.decode_bias  # (rows, kv, per_kv, Tb)
    m = torch.maximum(s1.amax(-1), _to_slots(s2.amax(-1), slots, group))  # (slots, kv, group*per_kv)
    p1 = torch.exp(s1 - m.unsqueeze(-1))
    p2 = torch.exp(s2 - _to_rows(m, slots, group).unsqueeze(-1))
    total = _to_rows(p1.sum(-1), slots, group) + p2.sum(-1)  # (rows, kv, per_kv)
    o1 = torch.matmul(p1.to(pool.dtype), prompt_v)  # (slots, kv, group*per_kv, D)
    o2 = torch.matmul(p2.to(pool.dtype), decode_v)  # (rows, kv, per_kv, D)
    out = (_to_rows(o1, slots, group).float() + o2.float()) / total.unsqueeze(-1)
    return out.reshape(rows, 1, heads, dim).to(query.dtype)


_FUSED = True


def merge_parts(
    o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor, slots: int, group: int
) -> torch.Tensor:
    """Merge the prompt part ``o1 (slots, kv, group*per_kv, D)`` and the decode part ``o2 (rows, kv, per_kv, D)``
    (fp32 outputs, natural-log log-sum-exps ``l1``, ``l2``) into the attention over both: ``o2 + w (o1 - o2)``
    with ``w = exp(l1) / (exp(l1) + exp(l2)) = sigmoid(l1 - l2)``, three element-wise kernels (the
    ``logaddexp`` / ``exp`` form took seven, in each of the step's 36 layers)."""
    weight = torch.sigmoid(_to_rows(l1, slots, group) - l2).unsqueeze(-1)
    return torch.lerp(o2, _to_rows(o1, slots, group), weight)


def _fused_ok(q: torch.Tensor) -> bool:
    return _FUSED and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One part on CUDA: PyTorch's memory-efficient attention kernel, output (fp32) and log-sum-exp.

    The kernel returns the log-sum-exp that merging the two parts needs (public ``scaled_dot_product_attention``
    does not), and reads each key/value block once per (slot, KV head) for all the queries stacked there.
    """
    batch, heads, queries, _ = q.shape
    full_bias = bias.to(q.dtype).expand(batch, heads, queries, bias.shape[-1])
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, full_bias, True, 0.0, False, scale=scaling
    )
    return out.float(), lse[..., :queries]


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q @ k^T`` with fp32 scores (bf16 operands accumulate and return in fp32 on CUDA)."""
    global _FP32_OUT
    if _FP32_OUT and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        batch = q.shape[:-2]
        try:
            out = torch.bmm(
                q.reshape(-1, *q.shape[-2:]),
                k.reshape(-1, *k.shape[-2:]).transpose(1, 2),
                out_dtype=torch.float32,
            )
            return out.view(*batch, q.shape[-2], k.shape[-2])
        except (TypeError, RuntimeError):  # a PyTorch without bmm(out_dtype=): round scores to bf16 first
            _FP32_OUT = False
    return torch.matmul(q, k.transpose(-1, -2)).float()


_FP32_OUT = True


def _to_slots(x: torch.Tensor, slots: int, group: int) -> torch.Tensor:
    """``(rows, kv, per_kv, ...)`` -> ``(slots, kv, group * per_kv, ...)``."""
    rest = x.shape[3:]
    x = x.view(slots, group, *x.shape[1:]).transpose(1, 2)
    return x.reshape(slots, x.shape[1], -1, *rest)


def _to_rows(x: torch.Tensor, slots: int, group: int) -> torch.Tensor:
    """``(slots, kv, group * per_kv, ...)`` -> ``(rows, kv, per_kv, ...)``."""
    rest = x.shape[3:]
    x = x.view(slots, x.shape[1], group, -1, *rest).transpose(1, 2)
    return x.reshape(slots * group, *x.shape[2:])


def engine_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | DecodeBatch | MixedBatch | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Pool attention for the engine's decode step; transformers' ``sdpa`` for everything else."""
    if isinstance(attention_mask, DecodeBatch | MixedBatch):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        attend = pool_attention if isinstance(attention_mask, DecodeBatch) else mixed_attention
        return attend(module.layer_idx, query, attention_mask, scale), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def register() -> None:
    """Make ``bbuqc_engine`` known to transformers (idempotent); masks are ``sdpa``'s."""
    AttentionInterface.register(NAME, engine_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_engine_attention(model: nn.Module) -> None:
    """Switch a model that runs ``sdpa`` to ``bbuqc_engine`` (same maths outside the engine's decode step).

    Models on another attention implementation (eager, flash) are switched too: their prefill and training
    forwards then run sdpa, which transformers supports for every Qwen3 / Qwen3-VL module.
    """
    register()
    inner = base_model(model)
    if inner.config._attn_implementation != NAME:
        inner.set_attn_implementation(NAME)


# Registered on import as well: a process that receives a switched model by pickling (a spawned DDP rank, a
# DataLoader worker) has never called ``use_engine_attention``, and transformers would not know the name there.
register()
