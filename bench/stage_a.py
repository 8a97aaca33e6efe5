"""Stage-A throughput: images/s of the engine (KV pool, continuous batching, CUDA-graph decode) vs HF generate.

Qwen3-VL-4B shape, random bf16 weights, the real per-mission Stage-A prompts, greedy decoding. Both run in
this one process on the same model, side by side, on the same images.

``--mixed`` (field data): photos in the sizes and orientations of field data (4:3 / 3:4, 16:9 / 9:16, square,
small screenshots, up to the preset's ``max_pixels``), and summaries that end at different lengths: a random
1/64 of the vocabulary counts as end-of-sequence for both engines (a random model never writes <|im_end|>),
so lengths are spread up to ``--new-tokens``. Without ``--mixed``: uniform 1024x768 photos, forced lengths.
Every capture is inside the timed run; "steady" leaves out the first call. ``--compile-layers``: our engine
with the decode step's layers compiled regionally (``generation.compile_layers``); the compile is inside
the first call's time and recorded as ``compiles`` / ``compile_seconds``. Our engine gets its prompts as the
Stage-A entry point does: encoded (chat template, image processor) by ``--encode-workers`` DataLoader workers
(default ``data.num_workers``'s: one per CPU core but one, at most 8) beside the generation loop, ``--load-batch``
photos at a time re-batched to ``--call-size`` (0 workers: inside ``generate``, timed), in prompt slots of
``bbuqc.photo_prompt_len`` tokens. ``engine.stats`` in the JSON splits the time into prefill and decode.

    python bench/stage_a.py --mixed --images 1000 --baseline-images 64 --out stage_a_mixed.json   # one H100
    python bench/stage_a.py --images 256 --out stage_a_uniform.json
    python bench/stage_a.py --mixed --images 1000 --compile-layers --out stage_a_mixed_compiled.json
    python bench/stage_a.py --mixed --images 1000 --baseline-batches --prefill-chunk-tokens 2048 --out chunked.json
    python bench/stage_a.py --mixed --images 1000 --baseline-batches --overlap-prefill --out overlapped.json
    python bench/stage_a.py --mixed --preset tiny --device cpu --images 6 --baseline-images 2 \
        --new-tokens 4 --call-size 4 --baseline-batches 2        # CPU smoke run
"""

from __future__ import annotations

import argparse
import functools
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from common import (
    add_no_cudnn_attention,
    add_no_fused_rms_norm,
    add_overlap_prefill,
    add_prefill_chunk_tokens,
    device_info,
    random_bundle,
    sync,
    write,
)
from PIL import Image
from torch.utils.data import Dataset

from bbuqc_lightning.config import loader_workers, photo_prompt_len
from bbuqc_lightning.data.images import resize_within
from bbuqc_lightning.generation.engine import Ahead, GenerationEngine, PromptEncoder, SamplingParams
from bbuqc_lightning.models.fused_norm import use_fused_rms_norm
from bbuqc_lightning.stage_a.datamodule import collate_images, photo_loader
from bbuqc_lightning.summaries.prompts import image_conversation, stage_a_prompt

ROOT = Path(__file__).resolve().parents[1]
# (width, height, weight): phone photos in both orientations dominate; some screenshots and squares
FIELD_SIZES = [
    (1024, 768, 3), (768, 1024, 3), (4000, 3000, 2), (3000, 4000, 2), (1920, 1080, 2), (1080, 1920, 2),
    (1280, 720, 1), (720, 1280, 1), (1024, 1024, 1), (800, 800, 1), (400, 300, 1), (300, 400, 1),
]  # fmt: skip


def field_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = [(w, h) for w, h, _ in FIELD_SIZES]
    return rng.choices(sizes, weights=[w for *_, w in FIELD_SIZES], k=n)


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """A photo-like image: a smooth gradient plus noise (cheap to make at any size)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(2, size[1] // 64), max(2, size[0] // 64), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.BILINEAR)
    noise = rng.integers(-20, 20, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def stage_a_prompts() -> list[str]:
    """The four missions' Stage-A prompts, as the Stage-A DataModule renders them."""
    prompts = yaml.safe_load((ROOT / "conf" / "prompts" / "stage_a.yaml").read_text())
    return [stage_a_prompt(prompts, mission) for mission in prompts["missions"]]


class Photos(Dataset):
    """``conversation`` and ``image``, or ``conversation`` and its encoded ``prompt``, per photo, the missions'
    prompts in turn (as the Stage-A DataModule's items: an encoded item does not ship its photo)."""

    def __init__(
        self, pics: Sequence[Image.Image], prompts: list[str], encoder: PromptEncoder | None
    ) -> None:
        self.pics, self.prompts, self.encoder = pics, prompts, encoder

    def __len__(self) -> int:
        return len(self.pics)

    def __getitem__(self, i: int) -> dict[str, Any]:
        conv = image_conversation(self.prompts[i % len(self.prompts)])
        meta = {"ticket_key": f"photo-{i}", "image_index": 0}  # the engine's key for a prompt handed ahead
        if self.encoder is None:
            return {"conversation": conv, "image": self.pics[i], "meta": meta}
        return {"conversation": conv, "prompt": self.encoder(conv, [self.pics[i]]), "meta": meta}


def run(
    engine: GenerationEngine,
    pics: Sequence[Image.Image],
    prompts: list[str],
    call: int,
    params,
    encode_workers: int = 0,
    pixel_dtype: str | None = None,
    load_batch: int = 32,
    lookahead: bool = False,
) -> dict:
    """Seconds per call over ``pics`` in calls of ``call`` images; images/s overall and after the first call.
    With ``encode_workers`` the prompts come encoded from DataLoader workers, ``load_batch`` photos at a time
    re-batched to ``call`` (as the Stage-A DataModule loads them), and the clock runs from the first call's
    start to the last call's end (waiting for a batch counts). ``lookahead`` (encoded prompts): each call hands
    the next call's prompts to the engine early, as ``data.lookahead`` does."""
    encoder = PromptEncoder(engine.processor, pixel_dtype=pixel_dtype) if encode_workers else None
    loader = photo_loader(
        Photos(pics, prompts, encoder),
        call,
        encode_workers,
        load_batch,
        collate_images,
        encoded=encoder is not None,
        lookahead=lookahead,
    )
    keys = lambda metas: [(m["ticket_key"], m["image_index"]) for m in metas]  # noqa: E731
    batches = iter(loader)  # the workers start before the clock
    seconds: list[float] = []
    sync()
    begin = time.perf_counter()
    for batch in batches:
        ahead = batch.get("ahead")
        engine.generate(
            batch["conversation"],
            params,
            images=[[p] for p in batch["image"]] if "image" in batch else None,
            encoded=batch.get("prompt"),
            keys=keys(batch["meta"]),
            ahead=Ahead(ahead["prompt"], keys(ahead["meta"])) if ahead else None,
        )
        sync()
        now = time.perf_counter()
        seconds.append(now - begin)
        begin = now
    total = sum(seconds)
    steady = sum(seconds[1:])
    steady_images = len(pics) - min(call, len(pics))
    return {
        "images": len(pics),
        "call_size": call,
        "seconds": total,
        "images_per_s": len(pics) / total,
        "steady_images_per_s": steady_images / steady if steady else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3_vl_4b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mixed", action="store_true", help="field-data sizes and summary lengths")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--images", type=int, default=256, help="images through our engine")
    parser.add_argument(
        "--baseline-images", type=int, default=64, help="images through HF generate (0: none)"
    )
    parser.add_argument("--call-size", type=int, default=256, help="images per engine.generate call")
    parser.add_argument("--rows", type=int, default=128, help="generation.max_rows")
    parser.add_argument(
        "--kv-fraction",
        type=float,
        default=0.3,
        help="generation.kv_memory_fraction (of the free GPU memory)",
    )
    parser.add_argument(
        "--baseline-batches",
        type=int,
        nargs="*",
        default=[8, 16],
        help="HF generate batch sizes (none: skip)",
    )
    parser.add_argument("--compile-layers", action="store_true", help="ours: compile the decode layers")
    parser.add_argument(
        "--encode-workers",
        type=int,
        default=loader_workers(),
        help="ours: DataLoader workers encoding prompts (0: in generate); default data.num_workers's",
    )
    parser.add_argument(
        "--no-lookahead",
        action="store_true",
        help="ours: each call alone (data.lookahead=false); default: the next call's prompts handed ahead",
    )
    parser.add_argument(
        "--load-batch",
        type=int,
        default=32,
        help="ours: photos a worker loads at a time (data.load_batch_size)",
    )
    parser.add_argument(
        "--prompt-len", type=int, default=None, help="generation.max_prompt_len (default: photo)"
    )
    add_no_cudnn_attention(parser)
    add_no_fused_rms_norm(parser)
    add_prefill_chunk_tokens(parser)
    add_overlap_prefill(parser)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    preset = yaml.safe_load((ROOT / "conf" / "model" / f"{args.preset}.yaml").read_text())
    # HF generate as its users run it (HF's RMSNorm); the engine's side gets the fused norms after it
    bundle = random_bundle(args.preset, args.device, max_pixels=preset["max_pixels"], fused_rms_norm=False)
    sizes = field_sizes(args.images) if args.mixed else [(1024, 768)] * args.images
    # Bounded to the preset's pixel budget as the Stage-A DataModule does in its loader workers (load_image),
    # so the engine's main thread does not resize 12-megapixel photos.
    bound = functools.partial(resize_within, min_pixels=preset["min_pixels"], max_pixels=preset["max_pixels"])
    distinct = {s: [bound(photo(s, seed)) for seed in range(4)] for s in set(sizes)}
    pics = [distinct[s][i % 4] for i, s in enumerate(sizes)]
    prompts = stage_a_prompts()
    results: dict[str, object] = {"config": vars(args), "device": device_info(), "hf": {}}
    eos_extra: list[int] = []
    if args.mixed:
        vocab = bundle.model.config.text_config.vocab_size
        eos_extra = random.Random(1).sample(range(vocab), vocab // 64)
        params = SamplingParams(max_new_tokens=args.new_tokens)
    else:
        params = SamplingParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    make = functools.partial(GenerationEngine, bundle.model, bundle.processor)
    hf = make(backend="hf")
    hf.eos_token_ids = [*hf.eos_token_ids, *eos_extra]
    for batch in args.baseline_batches if args.baseline_images > 0 else ():  # 0: no HF baseline
        results["hf"][batch] = run(hf, pics[: args.baseline_images], prompts, batch, params)
        print(f"hf generate batch {batch}: {results['hf'][batch]}", flush=True)
    if not args.no_fused_rms_norm:
        use_fused_rms_norm(bundle.model)
    ours = make(
        backend="pool",
        max_rows=args.rows,
        kv_memory_fraction=args.kv_fraction,
        max_prompt_len=args.prompt_len or photo_prompt_len(preset["max_pixels"]),
        max_new_tokens=args.new_tokens,
        compile_layers=args.compile_layers,
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        overlap_prefill=args.overlap_prefill,
        overlap_decode_priority=args.overlap_decode_priority,
        overlap_switch_interval=args.overlap_switch_interval,
    )
    ours.eos_token_ids = [*ours.eos_token_ids, *eos_extra]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    results["engine"] = run(
        ours,
        pics,
        prompts,
        args.call_size,
        params,
        args.encode_workers,
        str(bundle.model.dtype).split(".")[-1],
        args.load_batch,
        lookahead=not args.no_lookahead,
    )
    results["engine"]["stats"] = ours.stats
    results["engine"]["captures"] = ours.decode_step.captures
    results["engine"]["capture_seconds"] = ours.decode_step.capture_seconds
    results["engine"]["compile_layers"] = args.compile_layers
    results["engine"]["compiles"] = ours.decode_step.compiles
    results["engine"]["compile_seconds"] = ours.decode_step.compile_seconds
    results["engine"]["pool"] = ours.layout.describe()
    if torch.cuda.is_available():
        results["engine"]["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(f"engine: {results['engine']}", flush=True)
    base = max(results["hf"].values(), key=lambda r: r["images_per_s"], default=None)
    results["summary"] = {
        "hf_best_images_per_s": base["images_per_s"] if base else None,
        "engine_images_per_s": results["engine"]["images_per_s"],
        "engine_steady_images_per_s": results["engine"]["steady_images_per_s"],
        "ratio": results["engine"]["images_per_s"] / base["images_per_s"] if base else None,
    }
    write(args.out, results)


if __name__ == "__main__":
    main()
