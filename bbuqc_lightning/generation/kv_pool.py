"""The KV pool: the keys/values of every prompt and completion in flight, allocated once.

Two regions, both fixed at the first generation call and never grown:

- **prompt slots** ``(layers, S, kv_heads, max_prompt_len, head_dim)``: one slot per prompt in flight. The G
  samples of a prompt (GRPO's rollouts, the runner's K answers) share its slot: one copy of its keys/values.
- **decode rows** ``(layers, R, kv_heads, max_new_tokens, head_dim)``: the generated tokens of each sample.

``S`` comes from a memory budget (``kv_memory_gb``, or ``kv_memory_fraction`` of the free GPU memory) unless
``prompt_slots`` is given. Slots are contiguous per prompt, so decode attention reads a prompt with two plain
batched matrix products over a slice of the pool (no gather, no custom kernel; see
:mod:`~bbuqc_lightning.generation.pool_attention`). The price is that a slot reserves ``max_prompt_len``
tokens whatever the prompt's length: pick ``max_prompt_len`` for the data (Stage-B tickets of 20 photos need
about 3,000 tokens; a Stage-A photo at the 4B preset's ``max_pixels`` about 1,300).

Example::

    layout = plan_pool(model, max_prompt_len=4096, max_new_tokens=256, max_rows=64, kv_memory_gb=20)
    pool = KVPool(layout, dtype=torch.bfloat16, device="cuda")
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bbuqc_lightning.models.decoder import language_model

GB = 1e9
CPU_DEFAULT_BUDGET_GB = 0.5  # the CPU demo's tiny model: hundreds of slots; a real model on CPU: set it


@dataclass(frozen=True)
class PoolLayout:
    """Shape of the pool: ``prompt_slots`` prompts of ``max_prompt_len`` and ``rows`` of ``max_new_tokens``."""

    layers: int
    kv_heads: int
    head_dim: int
    prompt_slots: int
    max_prompt_len: int
    rows: int
    max_new_tokens: int
    itemsize: int

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.itemsize

    @property
    def nbytes(self) -> int:
        tokens = self.prompt_slots * self.max_prompt_len + self.rows * self.max_new_tokens
        return tokens * self.bytes_per_token

    def describe(self) -> str:
        return (
            f"KV pool {self.nbytes / GB:.2f} GB: {self.prompt_slots} prompt slots x {self.max_prompt_len} "
            f"tokens, {self.rows} rows x {self.max_new_tokens} new tokens"
        )


def plan_pool(
    model: nn.Module,
    dtype: torch.dtype,
    device: torch.device,
    max_prompt_len: int,
    max_new_tokens: int,
    max_rows: int,
    prompt_slots: int | None = None,
    kv_memory_gb: float | None = None,
    kv_memory_fraction: float = 0.3,
) -> PoolLayout:
    """Size the pool from the configuration; a budget too small for one prompt is a clear error."""
    config = language_model(model).config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layout = PoolLayout(
        layers=config.num_hidden_layers,
        kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        prompt_slots=1,
        max_prompt_len=max_prompt_len,
        rows=max_rows,
        max_new_tokens=max_new_tokens,
        itemsize=torch.empty((), dtype=dtype).element_size(),
    )
    if prompt_slots is None:
        budget = _budget_bytes(device, kv_memory_gb, kv_memory_fraction)
        decode = max_rows * max_new_tokens * layout.bytes_per_token
        prompt_slots = int((budget - decode) // (max_prompt_len * layout.bytes_per_token))
        if prompt_slots < 1:
            raise ValueError(
                f"generation: a KV pool of {budget / GB:.2f} GB cannot hold {max_rows} rows of "
                f"{max_new_tokens} new tokens ({decode / GB:.2f} GB) plus one prompt of {max_prompt_len} "
                "tokens; raise generation.kv_memory_gb / kv_memory_fraction or lower max_rows, "
                "max_new_tokens or max_prompt_len"
            )
    return PoolLayout(**{**layout.__dict__, "prompt_slots": min(prompt_slots, max_rows)})


def _budget_bytes(device: torch.device, kv_memory_gb: float | None, fraction: float) -> float:
    if kv_memory_gb is not None:
        return kv_memory_gb * GB
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free * fraction
    return CPU_DEFAULT_BUDGET_GB * GB


class KVPool:
    """The pool tensors (zero-initialised: masked positions must hold finite values) plus slot lengths."""

    def __init__(self, layout: PoolLayout, dtype: torch.dtype, device: torch.device | str) -> None:
        self.layout = layout
        self.dtype = dtype
        shape = (layout.layers, layout.prompt_slots, layout.kv_heads, layout.max_prompt_len, layout.head_dim)
        self.prompt_keys = torch.zeros(shape, dtype=dtype, device=device)
        self.prompt_values = torch.zeros(shape, dtype=dtype, device=device)
        shape = (layout.layers, layout.rows, layout.kv_heads, layout.max_new_tokens, layout.head_dim)
        self.decode_keys = torch.zeros(shape, dtype=dtype, device=device)
        self.decode_values = torch.zeros(shape, dtype=dtype, device=device)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.prompt_keys, self.prompt_values, self.decode_keys, self.decode_values

    def store_prompts(
        self,
        layer_kv: list[tuple[torch.Tensor, torch.Tensor]],
        lengths: list[int],
        slots: list[int],
    ) -> None:
        """Copy left-padded prefill keys/values ``(B, kv_heads, P, D)`` into slots at positions ``0..len-1``."""
        device = self.prompt_keys.device
        width = layer_kv[0][0].shape[2]
        rows = torch.cat([torch.full((n,), b) for b, n in enumerate(lengths)]).to(device)
        src = torch.cat([torch.arange(width - n, width) for n in lengths]).to(device)
        dst = torch.cat([torch.arange(n) for n in lengths]).to(device)
        slot = torch.cat([torch.full((n,), s) for s, n in zip(slots, lengths, strict=True)]).to(device)
        for layer, (keys, values) in enumerate(layer_kv):
            self.prompt_keys[layer][slot, :, dst] = keys[rows, :, src].to(self.dtype)
            self.prompt_values[layer][slot, :, dst] = values[rows, :, src].to(self.dtype)
