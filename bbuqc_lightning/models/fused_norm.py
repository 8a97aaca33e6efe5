"""Qwen3 / Qwen3-VL RMSNorm as PyTorch's fused ``rms_norm`` on the GPU.

HF's ``Qwen3RMSNorm`` / ``Qwen3VLTextRMSNorm`` run five element-wise and reduction kernels per call (upcast, square,
mean, multiply by ``rsqrt``, downcast and weight), four calls per decoder layer (input, post-attention, query and
key norms). A Qwen3-VL-4B decode step is 36 layers of small kernels, so the norms alone are ~700 of its ~2,800
kernels, and in a prefill of 32 photos they are six full passes over every hidden state. ``torch.nn.functional
.rms_norm`` runs one fused kernel on CUDA. transformers offers the same through ``use_kernel_forward_from_hub``,
which needs the ``kernels`` package and a download; serving engines (vLLM's ``RMSNorm`` custom op, SGLang) fuse
it the same way.

The module's class is swapped for a subclass (as :mod:`~bbuqc_lightning.models.patch_embed` does), so the weights,
state dict, saved folders and pickling are unchanged. The fused kernel runs only on the GPU and only where no
gradient flows: generation (prefill and the decode step), GRPO's frozen prefix and reference pass, evaluation.
Measured on an H100 (docs/BENCHMARKS.md) it made a decode step 0.81x and a prefill 0.90x the time, but GRPO's
optimisation phase (forward and backward with gradients) 1.1x slower, so training keeps HF's code, and with it
exact parity with HF and TRL; so does the CPU, where there is nothing to gain. The fused kernel multiplies by the
weight before rounding to the input's dtype, HF after; bf16 results differ by at most one rounding step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRMSNorm


def fused_rms_norm(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """HF's RMSNorm result through ``F.rms_norm`` (fp32 statistics, output in HF's dtype)."""
    weight = module.weight
    out_dtype = torch.promote_types(weight.dtype, hidden_states.dtype)
    if weight.dtype != hidden_states.dtype:  # mixed precision: fp32 weights over bf16 activations
        hidden_states = hidden_states.to(out_dtype)
        weight = weight.to(out_dtype)
    # autocast lists rms_norm as fp32-only: under bf16-mixed it would return fp32 where HF's code returns bf16
    with torch.autocast(hidden_states.device.type, enabled=False):
        return F.rms_norm(hidden_states, weight.shape, weight, module.variance_epsilon)


class _FusedForward:
    """The subclasses' ``forward``: the fused kernel on the GPU where no gradient flows (where it was measured
    faster), HF's code otherwise."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.is_cuda and not torch.is_grad_enabled():
            return fused_rms_norm(self, hidden_states)  # type: ignore[arg-type]
        return super().forward(hidden_states)  # type: ignore[misc]


class FusedQwen3RMSNorm(_FusedForward, Qwen3RMSNorm):
    pass


class FusedQwen3VLTextRMSNorm(_FusedForward, Qwen3VLTextRMSNorm):
    pass


_FUSED: dict[type[nn.Module], type[nn.Module]] = {
    Qwen3RMSNorm: FusedQwen3RMSNorm,
    Qwen3VLTextRMSNorm: FusedQwen3VLTextRMSNorm,
}


def use_fused_rms_norm(model: nn.Module) -> int:
    """Swap every Qwen3 / Qwen3-VL text RMSNorm in ``model`` for its fused subclass; returns how many. Norms under
    an accelerate hook (a model spread over GPUs with ``device_map``) are left as HF's: the hook keeps the
    forward it wrapped, so a swapped class would misreport what runs."""
    swapped = 0
    for module in model.modules():
        fused = _FUSED.get(type(module))
        # a module under an accelerate hook (device_map) keeps calling the forward it had when hooked
        if fused is not None and not hasattr(module, "_hf_hook"):
            module.__class__ = fused
            swapped += 1
    return swapped
