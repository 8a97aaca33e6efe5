"""Where a decode step's time goes: graph replay, sampling, and the top GPU kernels of one generate call.

python bench/profile_decode.py --out profile.json                       # one H100: GRPO and Stage-A buckets
python bench/profile_decode.py --compile-layers --out profile_compiled.json   # layers compiled regionally
python bench/profile_decode.py --preset tiny --device cpu --iters 1 --prompt-tokens 300   # CPU smoke

Run the two sides in separate processes (compiled code is cached for the whole process). The JSON records the
replay time per bucket, the captures, the compiles and their seconds, and (CUDA) the kernels one generate call
launched and their GPU time, so ``kernels_per_decode_step`` shows what fusing removed.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import add_no_fused_rms_norm, device_info, ms_per_call, random_bundle, sync, write
from grpo import samples

from bbuqc_lightning.generation.decode_step import Bucket
from bbuqc_lightning.generation.engine import GenerationEngine, SamplingParams
from bbuqc_lightning.generation.sampling import make_sampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3_vl_4b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--compile-layers", action="store_true", help="compile the decode step's layers")
    add_no_fused_rms_norm(parser)
    parser.add_argument("--out", default=None, help="JSON results")
    args = parser.parse_args()
    bundle = random_bundle(
        args.preset,
        args.device,
        dtype=torch.bfloat16 if args.device == "cuda" else torch.float32,
        fused_rms_norm=not args.no_fused_rms_norm,
    )
    engine = GenerationEngine(
        bundle.model,
        bundle.processor,
        max_rows=64,
        prompt_slots=64,
        max_prompt_len=2048,
        max_new_tokens=128,
        compile_layers=args.compile_layers,
    )
    data = samples(bundle.tokenizer, 8, args.prompt_tokens)
    params = SamplingParams(
        max_new_tokens=64, min_new_tokens=64, do_sample=True, temperature=0.7, num_return_sequences=8
    )
    convs = [d.messages for d in data]
    start = time.perf_counter()
    engine.generate(convs, params)
    sync()
    result: dict = {
        "config": vars(args),
        "device": device_info(),
        "first_generate_s": time.perf_counter() - start,
    }
    start = time.perf_counter()
    engine.generate(convs, params)
    sync()
    result["generate_s"] = time.perf_counter() - start
    print(f"generate 8 prompts x 8 samples x 64 tokens: {result['generate_s']:.3f} s")
    step = engine.decode_step
    result["replay_ms"] = {}
    for bucket in (
        Bucket(8, 8, 1024, 64),
        Bucket(64, 1, 1024, 128),
        Bucket(64, 1, 2048, 128),
    ):
        ms = ms_per_call(lambda b=bucket: step.run(b), args.iters)
        result["replay_ms"][f"slots{bucket.slots}_group{bucket.group}_prompt{bucket.prompt_bucket}"] = ms
        print(f"replay {bucket}: {ms:.2f} ms")
    sampler = make_sampler(params, engine.eos_token_ids)
    steps = torch.zeros(64, dtype=torch.long, device=step.logits.device)
    result["sampling_ms"] = ms_per_call(lambda: sampler(step.logits[:64], steps), args.iters)
    print(f"sampling 64 rows: {result['sampling_ms']:.2f} ms")
    result.update(
        captures=step.captures,
        capture_seconds=step.capture_seconds,
        compiles=step.compiles,
        compile_seconds=step.compile_seconds,
    )
    if args.device == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            engine.generate(convs, params)
            sync()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
        result.update(kernel_summary(prof, decode_steps=params.max_new_tokens - 1))
    write(args.out, result)


def kernel_summary(prof: torch.profiler.profile, decode_steps: int) -> dict:
    """Kernels launched by one profiled generate call and their GPU time (prefill included), per decode step."""
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = sum(e.count for e in events)
    top = sorted(events, key=lambda e: -e.device_time_total)[:15]
    return {
        "cuda_kernels": kernels,
        "cuda_time_ms": sum(e.device_time_total for e in events) / 1e3,
        "kernels_per_decode_step": kernels / decode_steps,
        "top_kernels": [
            {"name": e.key[:120], "count": e.count, "ms": e.device_time_total / 1e3} for e in top
        ],
    }


if __name__ == "__main__":
    main()
