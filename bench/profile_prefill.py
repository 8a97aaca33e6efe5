"""Where a Stage-A prefill's time goes: the vision tower against the language model, by chunk size, and the top
GPU kernels of one chunk.

    python bench/profile_prefill.py --out prefill.json                      # one H100 / H200, ~1 minute
    python bench/profile_prefill.py --preset tiny --device cpu --photos 4 --chunks 2   # CPU smoke

Photos in the field sizes of ``bench/stage_a.py --mixed``, encoded as Stage-A encodes them, prefilled through the
engine's own prefill (``GenerationEngine._prefill``) in chunks of ``--chunks`` prompts (longest first, as the
scheduler takes them). ``vision_s`` times the vision tower alone on the same chunks; the rest (``language_s``) is the
language model with the chunk's collate and copy to the GPU.
``vision_conv3d_s``: the vision tower with HF's ``Conv3d`` patch embedding instead of the matrix product (both
timed on the same device tensors, one after the other; before 2026-12-07 ``vision_s`` also counted the collate
and the host-to-device copy, so the two were not comparable).
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import yaml
from common import CONF, add_no_fused_rms_norm, device_info, random_bundle, sync, write
from profile_decode import kernel_summary
from stage_a import field_sizes, photo, stage_a_prompts

from bbuqc_lightning.config import photo_prompt_len
from bbuqc_lightning.data.images import resize_within
from bbuqc_lightning.generation.engine import GenerationEngine, PromptEncoder, collate
from bbuqc_lightning.generation.scheduler import Request
from bbuqc_lightning.models.patch_embed import LinearPatchEmbed, Qwen3VLVisionPatchEmbed
from bbuqc_lightning.summaries.prompts import image_conversation


def vision_seconds(visual, run: list, iters: int, embed_class: type) -> float:
    """The vision tower's seconds over the chunks' ready device tensors ``run``, with ``embed_class`` as the
    patch embedding (swapped in place: same weights), after one warm-up chunk (cuDNN picks its algorithm)."""
    embed = visual.patch_embed
    previous = embed.__class__
    embed.__class__ = embed_class
    try:
        visual(run[0][0], grid_thw=run[0][1])
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            for pixels, grid in run:
                visual(pixels, grid_thw=grid)
        sync()
        return (time.perf_counter() - start) / iters
    finally:
        embed.__class__ = previous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3_vl_4b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--iters", type=int, default=3)
    add_no_fused_rms_norm(parser)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    preset = yaml.safe_load((CONF / f"{args.preset}.yaml").read_text())
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    bundle = random_bundle(
        args.preset,
        args.device,
        dtype=dtype,
        max_pixels=preset["max_pixels"],
        fused_rms_norm=not args.no_fused_rms_norm,
    )
    engine = GenerationEngine(
        bundle.model,
        bundle.processor,
        max_prompt_len=photo_prompt_len(preset["max_pixels"]),
        max_new_tokens=8,
    )
    bound = functools.partial(resize_within, min_pixels=preset["min_pixels"], max_pixels=preset["max_pixels"])
    encode = PromptEncoder(bundle.processor, pixel_dtype=str(dtype).split(".")[-1])
    prompts = stage_a_prompts()
    requests = []
    for i, size in enumerate(field_sizes(args.photos)):
        inputs = encode(image_conversation(prompts[i % len(prompts)]), [bound(photo(size, i))])
        requests.append(Request(i, inputs, int(inputs["input_ids"].shape[1]), f"#{i}"))
    requests.sort(key=lambda r: -r.length)
    visual = bundle.model.model.visual
    result: dict = {"config": vars(args), "device": device_info(), "chunks": {}}
    with torch.no_grad():
        engine._prefill(requests[: args.chunks[0]])  # warm-up: kernels, handles
        for size in args.chunks:
            chunks = [requests[i : i + size] for i in range(0, len(requests), size)]
            tokens = sum(r.length for r in requests)
            padded = sum(len(c) * c[0].length for c in chunks)
            sync()
            start = time.perf_counter()
            for _ in range(args.iters):
                for chunk in chunks:
                    engine._prefill(chunk)
            sync()
            total = (time.perf_counter() - start) / args.iters
            batches = [collate([r.inputs for r in chunk], 0) for chunk in chunks]
            run = [
                (b["pixel_values"].to(args.device, dtype), b["image_grid_thw"].to(args.device))
                for b in batches
            ]
            vision = vision_seconds(visual, run, args.iters, LinearPatchEmbed)
            conv3d = vision_seconds(visual, run, args.iters, Qwen3VLVisionPatchEmbed)
            del run
            row = {
                "prefill_s": total,
                "vision_s": vision,
                "vision_conv3d_s": conv3d,  # the same with HF's Conv3d patch embedding
                "language_s": total - vision,
                "prompts_per_s": len(requests) / total,
                "tokens_per_s": tokens / total,
                "padding_share": 1 - tokens / padded,
            }
            result["chunks"][size] = row
            print(f"chunks of {size}: {row}", flush=True)
        if args.device == "cuda":
            chunk = requests[: args.chunks[-1] if len(args.chunks) > 1 else args.chunks[0]]
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            ) as prof:
                engine._prefill(chunk)
                sync()
            print(
                prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
            )
            print(
                prof.key_averages().table(
                    sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70
                )
            )
            result["profiled_chunk"] = len(chunk)
            result.update(kernel_summary(prof, decode_steps=1))
    write(args.out, result)


if __name__ == "__main__":
    main()
