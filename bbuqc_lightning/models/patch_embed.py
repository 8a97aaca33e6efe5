"""Qwen3-VL's patch embedding as a matrix product instead of a ``Conv3d``.

The vision tower embeds each 2x16x16 patch with an ``nn.Conv3d`` whose stride equals its kernel: exactly a linear
map of the flattened patch. cuDNN has no good algorithm for that shape on several GPU / dtype / version
combinations (transformers issue #45750: up to ~50,000x slower than the equivalent ``nn.Linear`` on Blackwell in
bf16; pytorch issue #174051: a 10-20x slower vision forward on torch 2.9), so vLLM (``Conv3dLayer``) and SGLang
run it as a GEMM. transformers offers the same as an opt-in load-time fusion (``fusion_config``) that renames the
weights (``patch_embed.linear_proj``); here the module's class is swapped for a subclass whose ``forward``
reads the same ``proj`` weight through ``F.linear``: the state dict, saved folders and every client that loads
them stay unchanged, and the model still pickles (``ddp_spawn``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchEmbed


class LinearPatchEmbed(Qwen3VLVisionPatchEmbed):
    """``Qwen3VLVisionPatchEmbed`` computing its ``Conv3d`` as ``F.linear`` over flattened patches."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight  # (embed_dim, channels, t, p, p): flattened in the input's patch order
        flat = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
        return F.linear(flat, weight.reshape(weight.shape[0], -1), self.proj.bias)


def use_linear_patch_embed(model: nn.Module) -> int:
    """Swap every Qwen3-VL patch embedding whose ``Conv3d`` is a plain patchify (stride = kernel, no padding,
    dilation or groups) for :class:`LinearPatchEmbed`; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        proj = getattr(module, "proj", None)
        if type(module) is not Qwen3VLVisionPatchEmbed or not isinstance(proj, nn.Conv3d):
            continue
        plain = (
            tuple(proj.stride) == tuple(proj.kernel_size)
            and tuple(proj.padding) == (0, 0, 0)
            and tuple(proj.dilation) == (1, 1, 1)
            and proj.groups == 1
        )
        if plain:
            module.__class__ = LinearPatchEmbed
            swapped += 1
    return swapped
