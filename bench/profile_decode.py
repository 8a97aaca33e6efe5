"""Where a decode step's time goes: graph replay, sampling, and the top GPU kernels of one generate call.

python bench/profile_decode.py                       # one H100: GRPO-shaped and Stage-A-shaped buckets
python bench/profile_decode.py --preset tiny --device cpu --iters 1 --prompt-tokens 300   # CPU smoke
"""

from __future__ import annotations

import argparse
import time

import torch
from common import random_bundle, sync
from grpo import samples

from bbuqc_lightning.generation.decode_step import Bucket
from bbuqc_lightning.generation.engine import GenerationEngine, SamplingParams
from bbuqc_lightning.generation.sampling import make_sampler


def per_call_ms(fn, iters: int) -> float:
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3_vl_4b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    args = parser.parse_args()
    bundle = random_bundle(
        args.preset, args.device, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32
    )
    engine = GenerationEngine(
        bundle.model, bundle.processor, max_rows=64, prompt_slots=64, max_prompt_len=2048, max_new_tokens=128
    )
    data = samples(bundle.tokenizer, 8, args.prompt_tokens)
    params = SamplingParams(
        max_new_tokens=64, min_new_tokens=64, do_sample=True, temperature=0.7, num_return_sequences=8
    )
    convs = [d.messages for d in data]
    engine.generate(convs, params)
    sync()
    start = time.perf_counter()
    engine.generate(convs, params)
    sync()
    print(f"generate 8 prompts x 8 samples x 64 tokens: {time.perf_counter() - start:.3f} s")
    step = engine.decode_step
    for bucket in (
        Bucket(8, 8, 1024, 64),
        Bucket(64, 1, 1024, 128),
        Bucket(64, 1, 2048, 128),
    ):
        print(f"replay {bucket}: {per_call_ms(lambda b=bucket: step.run(b), args.iters):.2f} ms")
    sampler = make_sampler(params, engine.eos_token_ids)
    steps = torch.zeros(64, dtype=torch.long, device=step.logits.device)
    print(f"sampling 64 rows: {per_call_ms(lambda: sampler(step.logits[:64], steps), args.iters):.2f} ms")
    if args.device == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            engine.generate(convs, params)
            sync()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
