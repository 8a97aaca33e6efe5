"""Stage-A throughput: images/s of the engine (static cache + CUDA-graph decode) vs plain HF generate.

Qwen3-VL-4B shape, random bf16 weights, 1024x768 images (768 image tokens), 128 forced new tokens, the
real Stage-A prompt. Both run in this one process on the same model, side by side.

    python bench/stage_a.py --out stage_a.json                                   # one H100
    python bench/stage_a.py --preset tiny --device cpu --image-size 64 48 --new-tokens 8 --batches 1 2 \
        --baseline-batches 1 --images 4                                          # CPU smoke run
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import device_info, random_bundle, timer, write
from PIL import Image

from bbuqc_lightning.data.summary_prompts import image_conversation
from bbuqc_lightning.generation.engine import GenerationEngine, SamplingParams

PROMPT = (
    "你是BBU安装质检助手。请用一行中文客观描述这张现场照片中与质检相关的物体。本次任务：BBU线缆布放要求。"
)


def images(n: int, size: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def throughput(
    engine: GenerationEngine, pics: list[Image.Image], batch: int, params: SamplingParams
) -> float:
    """images/s over ``pics`` in batches of ``batch`` (after one warm-up batch, which also compiles)."""
    conv = image_conversation(PROMPT)
    engine.generate([conv] * batch, params, images=[[p] for p in pics[:batch]])  # warm-up / compile
    times: dict[str, float] = {}
    with timer(times, "run"):
        for start in range(0, len(pics), batch):
            chunk = pics[start : start + batch]
            engine.generate([conv] * len(chunk), params, images=[[p] for p in chunk])
    return len(pics) / times["run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3_vl_4b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--image-size", type=int, nargs=2, default=[1024, 768])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--baseline-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--images", type=int, default=64, help="images timed per configuration")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    bundle = random_bundle(args.preset, args.device)
    params = SamplingParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    pics = images(args.images, tuple(args.image_size))
    results: dict[str, object] = {"config": vars(args), "device": device_info(), "hf": {}, "engine": {}}
    hf = GenerationEngine(bundle.model, bundle.processor, backend="hf")
    for batch in args.baseline_batches:
        n = max(batch, min(len(pics), 2 * batch if batch > 1 else 2))
        results["hf"][batch] = throughput(hf, pics[:n], batch, params)
        print(f"hf generate      batch {batch:3d}: {results['hf'][batch]:.3f} images/s", flush=True)
    ours = GenerationEngine(bundle.model, bundle.processor, backend="static")
    for batch in args.batches:
        n = max(batch, min(len(pics), 2 * batch))
        results["engine"][batch] = throughput(ours, pics[:n], batch, params)
        print(f"engine (static)  batch {batch:3d}: {results['engine'][batch]:.3f} images/s", flush=True)
    if torch.cuda.is_available():
        results["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    best = max(results["engine"], key=results["engine"].get)
    base_best = max(results["hf"], key=results["hf"].get)
    results["summary"] = {
        "engine_best_batch": best,
        "engine_best_images_per_s": results["engine"][best],
        "hf_best_batch": base_best,
        "hf_best_images_per_s": results["hf"][base_best],
        "ratio_best_vs_hf_best": results["engine"][best] / results["hf"][base_best],
    }
    write(args.out, results)


if __name__ == "__main__":
    main()
