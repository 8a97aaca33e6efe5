"""Regional compilation of the decode step's decoder layers (``generation.compile_layers: true``).

A decode step runs every decoder layer once per token. Eagerly, each layer launches dozens of small kernels
around its matrix products (HF's RMSNorm in fp32, q/k norms, rotary embedding, SiLU-mul, LoRA scaling and
adds, residual adds): at the 4B shape ~1,700 kernels a step. ``torch.compile`` fuses them, but compiling the
whole step per shape (the earlier engine, ~60 s per new prompt length) is what this engine removed. So only
the layer's two attention-free halves are compiled, as PyTorch's regional-compilation recipe does for
repeated blocks:

- ``before``: input RMSNorm, q/k/v projections, q/k norms, rotary embedding -> ``q, k, v``;
- eager in between: the key/value write into the pool and the pool attention
  (:mod:`~bbuqc_lightning.generation.pool_attention`, unchanged: the same code as without compilation);
- ``after``: output projection, residual, post-attention RMSNorm, MLP, residual.

Each half is one Python function compiled once and called for every layer with the layer as an argument:
with ``torch._dynamo.config.inline_inbuilt_nn_modules`` (on by default since PyTorch 2.5) a layer's
parameters are graph inputs, not constants, so the 36 identical layers reuse one compiled artifact (layers
with LoRA adapters get one more, bounded). The row dimension is marked *unbacked* (``mark_unbacked``: no
specialisation, not even for a single row), so buckets of every row count reuse it; prompt lengths never
reach these functions. Should a PyTorch fail to compile with an unbacked row dimension, the regions log a
warning and mark it dynamic instead (one more compile, for the single-row bucket). Mode "default" (no CUDA graphs of its own): the engine captures the step, compiled code
included, once per bucket as before; compiling happens in the capture's warm-up run, never inside a capture.

Counting: :func:`compiled_graphs` reads Dynamo's counter of graphs compiled in this process;
:class:`~bbuqc_lightning.generation.decode_step.DecodeStep` reports the difference as ``compiles``.

Example::

    regions = LayerRegions()                       # backend "inductor"; "aot_eager" traces without fusing
    hidden = regions.layer(layer, hidden, batch, (cos, sin))
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bbuqc_lightning.generation.pool_attention import DecodeBatch, pool_attention

log = logging.getLogger(__name__)
Rope = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (first compiles and recompiles alike)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _before_attention(
    layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: Rope
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF's decoder layer up to the attention call (Qwen3 / Qwen3-VL text layers, same operations in order)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = attn.q_norm(attn.q_proj(x).view(shape)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(x).view(shape)).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    q, k = rope(q, k, cos, sin)
    return q, k, v


def _after_attention(layer: nn.Module, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """HF's decoder layer after the attention call: ``attended (rows, 1, heads, D)`` -> next hidden state."""
    out = layer.self_attn.o_proj(attended.reshape(*hidden.shape[:-1], -1))
    hidden = hidden + out
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


class LayerRegions:
    """The two compiled halves of a decoder layer, shared by every layer and every bucket."""

    def __init__(self, backend: str = "inductor") -> None:
        self.backend = backend
        self.unbacked_rows = True
        self.before = torch.compile(_before_attention, backend=backend, dynamic=None)
        self.after = torch.compile(_after_attention, backend=backend, dynamic=None)

    def layer(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        batch: DecodeBatch,
        embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """One decoder layer of a decode step: compiled halves around the eager pool attention."""
        attn = layer.self_attn
        cos, sin = embeddings
        q, k, v = self._call(self.before, layer, hidden, cos, sin, _rope_of(attn))
        batch.update(k, v, attn.layer_idx)
        attended = pool_attention(attn.layer_idx, q, batch, attn.scaling)
        return self._call(self.after, layer, hidden, attended)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` with the row dimension of every tensor argument marked (see the module docstring)."""
        _mark_rows(args, self.unbacked_rows)
        try:
            return fn(*args)
        except Exception as exc:
            if not self.unbacked_rows:
                raise
            log.warning("compile_layers: unbacked row dimension failed (%s); marking it dynamic instead", exc)
            self.unbacked_rows = False
            args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)  # drop the marks
            _mark_rows(args, unbacked=False)
            return fn(*args)


def _mark_rows(args: tuple[Any, ...], unbacked: bool) -> None:
    """Compile for any row count (dimension 0) rather than once per bucket."""
    for t in args:
        if not isinstance(t, torch.Tensor):
            continue
        if unbacked:
            torch._dynamo.decorators.mark_unbacked(t, 0)
        elif t.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)


def _rope_of(attn: nn.Module) -> Rope:
    """The ``apply_rotary_pos_emb`` of the attention's own modelling file (Qwen3 and Qwen3-VL differ)."""
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb
