"""Decode-attention kernels on the KV pool's layout: the pool attention against FlexAttention, FlashInfer, flash-attn.

One decode-attention call of one layer, as the engine's decode step makes it: ``slots`` prompts, each read by
its ``group`` sample rows (the prompt slot shared by the group), plus each row's own generated tokens; prompt
lengths and decode steps differ per slot / row. Qwen3-VL-4B attention: 32 query heads, 8 KV heads, head dim 128,
bf16. Every candidate is the same cascade (prompt part read once per group + decode part, merged by
log-sum-exp) and is checked against the pool attention (``max_abs_diff``); each is timed over ``--iters`` calls.

(a) ``pool``: :func:`bbuqc_lightning.generation.pool_attention.pool_attention` (memory-efficient attention
    kernel on CUDA, matrix products on CPU).
(b) ``flex``: ``torch.nn.attention.flex_attention`` with a block mask per part (prompt length per slot, decode
    step per row), compiled; ``compile_s`` (first call) and ``block_mask_ms`` (per step, shared by the layers)
    are recorded apart. On CPU it runs uncompiled (PyTorch's reference implementation: numerics only).
(c) ``flashinfer``: a paged prefill wrapper over the prompt slots (a slot = one page, HND layout, no copy) and a
    paged decode wrapper over the decode rows, merged by ``flashinfer.merge_state``; ``plan_ms`` apart.
(d) ``flash_attn``: ``flash_attn_with_kvcache`` per part with ``cache_seqlens``; it wants (batch, seq, heads,
    dim) caches, so the pool's (batch, heads, seq, dim) slices are copied once outside the timing (a layout
    change of the pool would be needed to use it).
A candidate that cannot run is recorded with the reason (``skipped``).

    python bench/attention_kernels.py --out attention_kernels.json                  # one H100 / H200
    python bench/attention_kernels.py --device cpu --smoke --out attention_cpu.json # CPU smoke (tiny sizes)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from common import device_info, ms_per_call, sync, write

from bbuqc_lightning.generation.decode_step import _bias
from bbuqc_lightning.generation.kv_pool import KVPool, PoolLayout
from bbuqc_lightning.generation.pool_attention import DecodeBatch, pool_attention

# name: (slots, group, prompt bucket, shortest prompt, new-token bucket): GRPO (G 8) and Stage-A (1 sample)
SCENARIOS = {"grpo": (8, 8, 3072, 540, 64), "stage_a": (128, 1, 2048, 800, 128)}
SMOKE = {"smoke": (3, 2, 32, 5, 8)}


class Case:
    """Pool tensors, per-slot prompt lengths, per-row steps and queries of one scenario (one layer)."""

    def __init__(self, spec: tuple[int, ...], heads: int, kv_heads: int, dim: int, dtype, device) -> None:
        slots, group, prompt_bucket, shortest, new_bucket = spec
        gen = torch.Generator().manual_seed(0)
        self.slots, self.group, self.rows = slots, group, slots * group
        self.heads, self.kv_heads, self.dim, self.scale = heads, kv_heads, dim, dim**-0.5
        layout = PoolLayout(1, kv_heads, dim, slots, prompt_bucket, self.rows, new_bucket, dtype.itemsize)
        self.pool = KVPool(layout, dtype, device)
        for t in self.pool.tensors():
            t.copy_(torch.randn(t.shape, generator=gen).to(dtype))
        lens = torch.randint(shortest, prompt_bucket + 1, (slots,), generator=gen)
        self.prompt_lens = lens.to(device)
        self.steps = torch.randint(0, new_bucket, (self.rows,), generator=gen).to(device)
        self.query = torch.randn(self.rows, heads, 1, dim, generator=gen).to(device, dtype)
        self.batch = DecodeBatch(
            self.pool, slots, group, prompt_bucket, new_bucket, self.steps,
            _bias(torch.arange(prompt_bucket, device=device)[None] < self.prompt_lens[:, None], dtype),
            _bias(torch.arange(new_bucket, device=device)[None] <= self.steps[:, None], dtype),
            torch.arange(self.rows, device=device),
        )  # fmt: skip

    def parts(self) -> tuple[torch.Tensor, ...]:
        """``q_group (slots, heads, group, D)``, ``q_row (rows, heads, 1, D)``, prompt k/v, decode k/v."""
        p = self.pool
        q_group = self.query.view(self.slots, self.group, self.heads, self.dim).transpose(1, 2)
        return q_group, self.query, p.prompt_keys[0], p.prompt_values[0], p.decode_keys[0], p.decode_values[0]

    def merge(self, o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
        """Prompt part ``(slots, heads, group, D)`` + decode part ``(rows, heads, 1, D)``, natural-log LSEs."""
        o1 = o1.transpose(1, 2).reshape(self.rows, self.heads, self.dim).float()
        l1 = l1.transpose(1, 2).reshape(self.rows, self.heads).float()
        o2, l2 = o2[:, :, 0].float(), l2[:, :, 0].float()
        total = torch.logaddexp(l1, l2)
        out = o1 * torch.exp(l1 - total)[..., None] + o2 * torch.exp(l2 - total)[..., None]
        return out[:, None].to(self.query.dtype)  # (rows, 1, heads, D) like pool_attention


def pool_candidate(case: Case) -> tuple[Callable[[], torch.Tensor], dict[str, Any]]:
    return lambda: pool_attention(0, case.query, case.batch, case.scale), {}


def flex_candidate(case: Case, device: str) -> tuple[Callable[[], torch.Tensor], dict[str, Any]]:
    from torch.nn.attention import flex_attention as fa

    lens, steps = case.prompt_lens, case.steps
    q_group, q_row, pk, pv, dk, dv = case.parts()
    prompt_bucket, new_bucket = case.batch.prompt_bucket, case.batch.new_bucket

    def prompt_mask(b, h, q, kv):
        return kv < lens[b]

    def decode_mask(b, h, q, kv):
        return kv <= steps[b]

    info: dict[str, Any] = {}
    start = time.perf_counter()
    masks = (
        fa.create_block_mask(prompt_mask, case.slots, None, case.group, prompt_bucket, device=device),
        fa.create_block_mask(decode_mask, case.rows, None, 1, new_bucket, device=device),
    )
    sync()
    info["first_block_mask_s"] = time.perf_counter() - start
    info["block_mask_ms"] = ms_per_call(
        lambda: (
            fa.create_block_mask(prompt_mask, case.slots, None, case.group, prompt_bucket, device=device),
            fa.create_block_mask(decode_mask, case.rows, None, 1, new_bucket, device=device),
        ),
        3,
    )
    compiled = device == "cuda"
    attend = torch.compile(fa.flex_attention, dynamic=False) if compiled else fa.flex_attention
    info["compiled"] = compiled
    if not compiled:
        info["note"] = "CPU smoke: uncompiled reference implementation (numerics only, not speed)"
    aux = fa.AuxRequest(lse=True) if hasattr(fa, "AuxRequest") else None

    def part(q, k, v, mask):
        if aux is not None:
            out, extra = attend(q, k, v, block_mask=mask, scale=case.scale, enable_gqa=True, return_aux=aux)
            return out, extra.lse
        return attend(q, k, v, block_mask=mask, scale=case.scale, enable_gqa=True, return_lse=True)

    def run() -> torch.Tensor:
        o1, l1 = part(
            q_group, pk[: case.slots, :, :prompt_bucket], pv[: case.slots, :, :prompt_bucket], masks[0]
        )
        o2, l2 = part(q_row, dk[:, :, :new_bucket], dv[:, :, :new_bucket], masks[1])
        return case.merge(o1, l1, o2, l2)

    start = time.perf_counter()
    run()
    sync()
    info["compile_s"] = time.perf_counter() - start
    return run, info


def flashinfer_candidate(case: Case) -> tuple[Callable[[], torch.Tensor], dict[str, Any]]:
    import flashinfer

    device = case.query.device
    dtype = case.query.dtype
    _, q_row, pk, pv, dk, dv = case.parts()
    q = q_row[:, :, 0].contiguous()  # (rows, heads, D): the rows of a slot are its `group` query tokens
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout="HND")
    decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="HND")
    arange = torch.arange(case.rows + 1, dtype=torch.int32, device=device)

    def plan() -> None:
        prefill.plan(
            arange[: case.slots + 1] * case.group, arange[: case.slots + 1], arange[: case.slots],
            case.prompt_lens.int(), case.heads, case.kv_heads, case.dim, pk.shape[2],
            causal=False, q_data_type=dtype, kv_data_type=dtype, sm_scale=case.scale,
        )  # fmt: skip
        decode.plan(
            arange, arange[: case.rows], (case.steps + 1).int(), case.heads, case.kv_heads, case.dim,
            dk.shape[2], q_data_type=dtype, kv_data_type=dtype, sm_scale=case.scale,
        )  # fmt: skip

    start = time.perf_counter()
    plan()
    sync()
    info: dict[str, Any] = {"first_plan_s": time.perf_counter() - start, "plan_ms": ms_per_call(plan, 3)}

    def run() -> torch.Tensor:
        o1, l1 = prefill.run(q, (pk, pv), return_lse=True)
        o2, l2 = decode.run(q, (dk, dv), return_lse=True)
        out, _ = flashinfer.merge_state(o1, l1, o2, l2)
        return out[:, None]

    start = time.perf_counter()
    run()
    sync()
    info["first_call_s"] = time.perf_counter() - start  # JIT compile of the kernels when not prebuilt
    return run, info


def flash_attn_candidate(case: Case) -> tuple[Callable[[], torch.Tensor], dict[str, Any]]:
    from flash_attn import flash_attn_with_kvcache

    q_group, q_row, pk, pv, dk, dv = case.parts()
    pk, pv, dk, dv = (t.transpose(1, 2).contiguous() for t in (pk, pv, dk, dv))  # -> (batch, seq, kv, D)
    qg = q_group.transpose(1, 2).contiguous()  # (slots, group, heads, D)
    qr = q_row.transpose(1, 2).contiguous()  # (rows, 1, heads, D)
    prompt_lens, decode_lens = case.prompt_lens.int(), (case.steps + 1).int()

    def run() -> torch.Tensor:
        o1, l1 = flash_attn_with_kvcache(
            qg, pk, pv, cache_seqlens=prompt_lens, softmax_scale=case.scale, return_softmax_lse=True
        )
        o2, l2 = flash_attn_with_kvcache(
            qr, dk, dv, cache_seqlens=decode_lens, softmax_scale=case.scale, return_softmax_lse=True
        )
        return case.merge(o1.transpose(1, 2), l1, o2.transpose(1, 2), l2)

    return run, {"note": "caches copied to (batch, seq, heads, dim) outside the timing"}


def reference(case: Case) -> torch.Tensor:
    """fp32 softmax attention of each row over its prompt ++ its own tokens (the definition)."""
    out = torch.empty(case.rows, 1, case.heads, case.dim)
    p, per_kv = case.pool, case.heads // case.kv_heads
    for r in range(case.rows):
        s, n, t = r // case.group, int(case.prompt_lens[r // case.group]), int(case.steps[r]) + 1
        k = torch.cat([p.prompt_keys[0, s, :, :n], p.decode_keys[0, r, :, :t]], 1).float().cpu()
        v = torch.cat([p.prompt_values[0, s, :, :n], p.decode_values[0, r, :, :t]], 1).float().cpu()
        q = case.query[r, :, 0].float().cpu().view(case.kv_heads, per_kv, case.dim)
        w = torch.softmax(q @ k.transpose(1, 2) * case.scale, dim=-1)
        out[r, 0] = (w @ v).reshape(case.heads, case.dim)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU smoke run)")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--scenarios", nargs="*", default=None, help=f"of {sorted(SCENARIOS)}")
    parser.add_argument("--skip", nargs="*", default=[], help="candidates to leave out")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    heads, kv_heads, dim, dtype = (4, 2, 16, torch.float32) if args.smoke else (32, 8, 128, torch.bfloat16)
    scenarios = SMOKE if args.smoke else {k: SCENARIOS[k] for k in args.scenarios or SCENARIOS}
    iters = 2 if args.smoke else args.iters
    results: dict[str, Any] = {"config": vars(args), "device": device_info(), "scenarios": {}}
    for name, spec in scenarios.items():
        case = Case(spec, heads, kv_heads, dim, dtype, args.device)
        want = pool_attention(0, case.query, case.batch, case.scale).float()
        row: dict[str, Any] = {
            "slots_group_prompt_bucket_shortest_new_bucket": spec,
            "prompt_lens": case.prompt_lens.tolist(),
            "pool_vs_fp32_reference": float((want.cpu() - reference(case)).abs().max()),
        }
        builders = {
            "pool": lambda c=case: pool_candidate(c),
            "flex": lambda c=case: flex_candidate(c, args.device),
            "flashinfer": lambda c=case: flashinfer_candidate(c),
            "flash_attn": lambda c=case: flash_attn_candidate(c),
        }
        for key, build in builders.items():
            if key in args.skip:
                row[key] = {"skipped": "--skip"}
                continue
            if key in ("flashinfer", "flash_attn") and args.device != "cuda":
                row[key] = {"skipped": "CUDA only"}
                continue
            try:
                run, info = build()
                got = run().float()
                info["max_abs_diff_vs_pool"] = float((got - want).abs().max())
                info["ms"] = ms_per_call(run, iters)
            except Exception as exc:  # a candidate that cannot run is a result, not a crash
                info = {"skipped": f"{type(exc).__name__}: {str(exc)[:300]}"}
            row[key] = info
            print(f"{name} {key}: {info}", flush=True)
        results["scenarios"][name] = row
        # bytes a decode-attention call must read at least: each prompt once, each row's own tokens
        tokens = int(case.prompt_lens.sum()) + int((case.steps + 1).sum())
        row["min_bytes_mb"] = tokens * 2 * kv_heads * dim * dtype.itemsize / 1e6
        for key in builders:
            if "ms" in row[key]:
                row[key]["gb_per_s"] = row["min_bytes_mb"] / row[key]["ms"]
    write(args.out, results)


if __name__ == "__main__":
    main()
