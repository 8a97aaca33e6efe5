"""Shared benchmark helpers: a real-size Qwen3-VL with random weights built directly on the GPU, timers.

Not a test: run on a GPU machine, results go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import Qwen3VLForConditionalGeneration

from bbuqc_lightning.models.factory import (
    ModelBundle,
    build_tokenizer,
    build_vl_processor,
    vl_config_from_architecture,
)
from bbuqc_lightning.models.fused_norm import use_fused_rms_norm
from bbuqc_lightning.models.patch_embed import use_linear_patch_embed

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def random_bundle(
    preset: str,
    device: str,
    dtype: torch.dtype = torch.bfloat16,
    max_pixels: int = 786432,
    linear_patch_embed: bool = True,
    fused_rms_norm: bool = True,
) -> ModelBundle:
    """The preset's architecture with random weights, initialised on ``device`` (fast, no CPU copy); the patch
    embedding as a matrix product and the RMSNorms fused, as ``load_model`` builds it (``linear_patch_embed=False``:
    HF's Conv3d; ``fused_rms_norm=False``: HF's RMSNorm code)."""
    arch = yaml.safe_load((CONF / f"{preset}.yaml").read_text())["architecture"]
    config = vl_config_from_architecture(arch)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    if linear_patch_embed:
        use_linear_patch_embed(model)
    if fused_rms_norm:
        use_fused_rms_norm(model)
    tokenizer = build_tokenizer()
    processor = build_vl_processor(tokenizer, min_pixels=4096, max_pixels=max_pixels)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return ModelBundle(model, processor, tokenizer, "vl", f"random-{preset}")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ms_per_call(fn: Callable[[], Any], iters: int) -> float:
    """Milliseconds per call of ``fn`` after one warm-up call, the GPU synchronised around the timed loop."""
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters * 1e3


@contextmanager
def timer(out: dict[str, float], key: str):
    sync()
    start = time.perf_counter()
    yield
    sync()
    out[key] = time.perf_counter() - start


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    import transformers

    info["transformers"] = transformers.__version__
    return info


def add_no_cudnn_attention(parser: argparse.ArgumentParser) -> None:
    """``--no-cudnn-attention``: SDPA without cuDNN for this process, as ``model.cudnn_attention=false`` does."""

    class Off(argparse.Action):
        def __call__(self, parser: Any, namespace: argparse.Namespace, *args: Any) -> None:
            torch.backends.cuda.enable_cudnn_sdp(False)
            setattr(namespace, self.dest, True)  # recorded in the JSON's config

    parser.add_argument(
        "--no-cudnn-attention",
        action=Off,
        nargs=0,
        default=False,
        help="SDPA without cuDNN (model.cudnn_attention=false): no execution plan built per new shape",
    )


def add_no_fused_rms_norm(parser: argparse.ArgumentParser) -> None:
    """``--no-fused-rms-norm``: HF's RMSNorm code, as ``model.fused_rms_norm=false`` does (pass
    ``fused_rms_norm=not args.no_fused_rms_norm`` to :func:`random_bundle`)."""
    parser.add_argument(
        "--no-fused-rms-norm",
        action="store_true",
        help="HF's RMSNorm (model.fused_rms_norm=false) instead of PyTorch's fused kernel",
    )


def add_prefill_chunk_tokens(parser: argparse.ArgumentParser) -> None:
    """``--prefill-chunk-tokens N``: our engine with chunked prefill (``generation.prefill_chunk_tokens``)."""
    parser.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=None,
        help="ours: chunked prefill, N prompt tokens a step beside the decode rows (generation.prefill_chunk_tokens)",
    )


def add_overlap_prefill(parser: argparse.ArgumentParser) -> None:
    """``--overlap-prefill``: our engine with overlapped prefill (``generation.overlap_prefill``);
    ``--overlap-decode-priority``: and its decode steps on a high-priority stream; ``--overlap-switch-interval S``:
    and the interpreter's thread switch interval at S seconds during a call."""
    parser.add_argument(
        "--overlap-prefill",
        action="store_true",
        help="ours: whole-prompt prefills on a side CUDA stream beside the decode steps (generation.overlap_prefill)",
    )
    parser.add_argument(
        "--overlap-decode-priority",
        action="store_true",
        help="ours, with --overlap-prefill: the decode steps on a high-priority CUDA stream "
        "(generation.overlap_decode_priority)",
    )
    parser.add_argument(
        "--overlap-switch-interval",
        type=float,
        default=None,
        help="ours, with --overlap-prefill: sys.setswitchinterval during a call, seconds "
        "(generation.overlap_switch_interval)",
    )


def write(path: str | None, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, indent=2)
    print(text)
    if path:
        Path(path).write_text(text)
