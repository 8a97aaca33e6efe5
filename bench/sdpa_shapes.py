"""What a new padded shape costs in a training step, with and without cuDNN attention, in one process.

Mixed-shape GRPO meets new (rows, padded length) shapes in nearly every step, and PyTorch's SDPA with a padding
mask goes to cuDNN first on Hopper (torch 2.11), which builds an execution plan per new shape. For each arm this
runs a GRPO-like forward and backward (the language model over ``--rows`` left-padded rows, gradients in the last
``--trainable`` blocks only) at ``--lengths`` padded lengths, twice each: the first call meets the shape, the
second reuses whatever was built. The arms use different lengths (offset by ``--offset``) so neither finds the
other's plans. ``new_shape_extra_s`` = first minus second call, per length.

    python bench/sdpa_shapes.py --out sdpa_shapes.json                                 # one H100 / H200, ~1 min
    python bench/sdpa_shapes.py --preset tiny --device cpu --lengths 16 24 --rows 2    # CPU smoke
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from common import device_info, random_bundle, sync, write

from bbuqc_lightning.models.decoder import language_model


def step(lm: Any, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Seconds for one forward and backward (gradients in the blocks left trainable), GPU synchronised."""
    sync()
    start = time.perf_counter()
    hidden = lm(input_ids=ids, attention_mask=mask).last_hidden_state
    hidden.float().square().mean().backward()
    sync()
    return time.perf_counter() - start


def arm(lm: Any, lengths: list[int], rows: int, vocab: int, device: str) -> dict[str, Any]:
    per_length = {}
    generator = torch.Generator().manual_seed(0)
    for length in lengths:
        ids = torch.randint(0, vocab, (rows, length), generator=generator).to(device)
        mask = torch.ones(rows, length, dtype=torch.long)
        for row in range(rows):  # left padding of 0 .. length/2 tokens, as a batch of mixed prompts has
            mask[row, : (row * length) // (2 * rows)] = 0
        mask = mask.to(device)
        first, second = step(lm, ids, mask), step(lm, ids, mask)
        per_length[length] = {"first_s": first, "second_s": second, "new_shape_extra_s": first - second}
        print(f"length {length}: {per_length[length]}", flush=True)
    extras = [r["new_shape_extra_s"] for r in per_length.values()]
    return {
        "lengths": per_length,
        "median_new_shape_extra_s": statistics.median(extras),
        "median_second_s": statistics.median(r["second_s"] for r in per_length.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3_vl_4b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=16, help="rows a micro-batch (bench/grpo.py: 16)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[700, 1100, 1500, 1900, 2300])
    parser.add_argument("--offset", type=int, default=8, help="the second arm's lengths: these plus this")
    parser.add_argument("--trainable", type=int, default=4, help="last blocks with gradients (LoRA's K)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    bundle = random_bundle(args.preset, args.device, dtype=dtype)
    lm = language_model(bundle.model)
    lm.requires_grad_(False)
    for block in lm.layers[-args.trainable :]:
        block.requires_grad_(True)
    vocab = lm.embed_tokens.num_embeddings
    ones = torch.ones(1, 8, dtype=torch.long, device=args.device)
    step(lm, ones, ones)  # kernels, handles
    result: dict[str, Any] = {"config": vars(args), "device": device_info(), "arms": {}}
    result["arms"]["cudnn_first"] = arm(lm, args.lengths, args.rows, vocab, args.device)
    torch.backends.cuda.enable_cudnn_sdp(False)  # model.cudnn_attention=false
    shifted = [n + args.offset for n in args.lengths]
    result["arms"]["no_cudnn"] = arm(lm, shifted, args.rows, vocab, args.device)
    a, b = result["arms"]["cudnn_first"], result["arms"]["no_cudnn"]
    result["summary"] = {
        "new_shape_extra_s": {
            "cudnn_first": a["median_new_shape_extra_s"],
            "no_cudnn": b["median_new_shape_extra_s"],
        },
        "cached_step_s": {"cudnn_first": a["median_second_s"], "no_cudnn": b["median_second_s"]},
    }
    write(args.out, result)


if __name__ == "__main__":
    main()
