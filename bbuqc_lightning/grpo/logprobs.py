"""Per-token log-probabilities of chosen tokens without materialising full ``(B, T, V)`` fp32 logits.

Qwen3-VL's vocabulary is 151,936: fp32 logits for 8 completions of 128 tokens are ~620 MB, and autograd would
keep them (and their softmax) alive until backward. ``completion_logprobs`` projects the final hidden states
through the LM head a chunk of tokens at a time and, when gradients are needed, checkpoints each chunk so that
only one chunk's logits exist at any moment, in the forward and in the backward pass.

Maths as TRL 1.16 (``selective_log_softmax`` / its fused LM head): the LM-head product is taken in the input
dtype (bf16 logits under bf16 training, as TRL's chunked kernel rounds them), then
``log_softmax(logits.float() / T)`` is evaluated in fp32 and the chosen token's entry kept. Qwen3-VL has no
logit scaling or soft-capping, so neither is applied here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature).gather(-1, index)``, one leading row at a time to bound memory.

    Same algorithm as TRL's non-Triton path: for fp32/fp64 logits, ``x_i - logsumexp(x)``; for half precision,
    where that difference is inaccurate, a per-row ``log_softmax``. ``index`` has shape ``logits.shape[:-1]``.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if temperature != 1.0:
        logits = logits / temperature
    index = index.unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index).squeeze(-1)
        logsumexp = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return selected - logsumexp
    rows = [F.log_softmax(row, dim=-1).gather(-1, idx) for row, idx in zip(logits, index, strict=True)]
    return torch.stack(rows).squeeze(-1)


def _chunk_logps(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float
) -> Tensor:
    """Log-probs for one chunk of tokens; its ``(n, V)`` fp32 logits are the only vocabulary-sized tensor."""
    logits = F.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def completion_logprobs(
    hidden_states: Tensor,
    lm_head_weight: Tensor,
    completion_ids: Tensor,
    chunk_size: int,
    temperature: float = 1.0,
    *,
    completion_mask: Tensor | None = None,
    lm_head_bias: Tensor | None = None,
) -> Tensor:
    """``(B, T)`` fp32 log-probs of ``completion_ids`` under ``softmax(lm_head(hidden) / temperature)``.

    Args:
        hidden_states: ``(B, T, H)`` final-layer states at the positions that *predict* each completion token
            (the position before it, i.e. already shifted).
        lm_head_weight: ``(V, H)`` LM-head weight (``model.get_output_embeddings().weight``).
        completion_ids: ``(B, T)`` the sampled completion tokens.
        chunk_size: tokens projected per chunk; peak extra memory is about ``chunk_size * V * 4`` bytes (x2-3
            in backward) instead of ``B * T * V * 4``.
        temperature: sampling temperature; logits are divided by it, as TRL does.
        completion_mask: optional ``(B, T)``; masked positions are skipped and get log-prob 0 (as TRL).
        lm_head_bias: optional ``(V,)`` bias (Qwen3-VL has none).

    Gradients flow to ``hidden_states`` and ``lm_head_weight``; each chunk is recomputed in backward.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, length, hidden_size = hidden_states.shape
    flat_hidden = hidden_states.reshape(-1, hidden_size)
    flat_ids = completion_ids.reshape(-1)
    keep = None if completion_mask is None else completion_mask.reshape(-1).bool()
    if keep is not None:
        flat_hidden, flat_ids = flat_hidden[keep], flat_ids[keep]
    chunks = [
        _run_chunk(
            flat_hidden[start : start + chunk_size],
            lm_head_weight,
            lm_head_bias,
            flat_ids[start : start + chunk_size],
            temperature,
        )
        for start in range(0, max(flat_ids.numel(), 1), chunk_size)  # >= 1 chunk: all-masked stays in graph
    ]
    logps = torch.cat(chunks)
    if keep is not None:  # padded positions get log-prob 0, as TRL's fused LM head
        logps = logps.new_zeros(keep.shape).masked_scatter(keep, logps)
    return logps.view(batch, length)


def _run_chunk(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float
) -> Tensor:
    """Checkpoint the chunk when autograd would otherwise store its logits for backward."""
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not needs_grad:
        return _chunk_logps(hidden, weight, bias, targets, temperature)
    return checkpoint(
        _chunk_logps,
        hidden,
        weight,
        bias,
        targets,
        temperature,
        use_reentrant=False,
        preserve_rng_state=False,
    )
