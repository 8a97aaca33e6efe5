"""What slows a decode step beside a prefill: the GPU's SMs, the host's GIL, and what a high-priority stream buys.

    python bench/decode_beside.py --out decode_beside.json                               # one H100 / H200, ~1 min
    python bench/decode_beside.py --preset tiny --device cpu --iters 2 --out smoke.json  # CPU smoke

Overlapped prefill (``generation.overlap_prefill``) ran Stage-A's decode steps in 34 ms instead of 20 while whole-prompt
prefills ran beside them on a side stream (docs/BENCHMARKS.md). Two causes fit that: the prefill's large matrix products
hold the SMs and the decode step's small kernels queue behind them, or the worker thread's Python holds the GIL while
the main thread wants to launch the next step. This script times one decode step (a CUDA-graph replay and a host sync,
as the scheduler runs it) in each condition, one process, the same bucket:

- ``alone``: nothing beside it;
- ``gemm``: beside a queue of prefill-sized matrix products (``--gemm-tokens`` x hidden @ hidden x intermediate, bf16)
  on a side stream of the default priority, as the prefill's; no host work beside it;
- ``gil``: beside a Python thread that launches small kernels on a side stream in a loop (host and GIL load, almost no
  GPU load), as a prefill's module calls do;
- ``gil_switch``: the same with the interpreter's switch interval at ``--switch-interval`` seconds
  (``generation.overlap_switch_interval``) instead of Python's 5 ms;
- ``priority_alone`` / ``priority_gemm``: the same step replayed on a stream of the highest priority
  (``generation.overlap_decode_priority``; its graph captured under that priority), alone and beside the matrix
  products.

Also the matrix products' milliseconds alone and beside the decode steps (``gemm_ms``), and whether their queue
outlasted each timed window (``load_covered``). On CPU there are no streams: ``gemm`` runs the products in a thread
(real contention for the two cores, not a GPU reading) and the priority conditions are skipped.

First H100 reading (docs/BENCHMARKS.md, eighth hold): a step alone 19.7 ms, beside the launching thread 20.3 ms with
either switch interval, on the high-priority stream 19.2 ms. Its ``gemm`` conditions were void (``load_covered``
false: the products, then launched one by one, had mostly run before the timed steps began); they are now queued as
CUDA-graph replays, not re-run on a GPU yet.
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from common import device_info, random_bundle, sync, write

from bbuqc_lightning.generation.decode_step import Bucket
from bbuqc_lightning.generation.engine import GenerationEngine, SamplingParams

QUEUED = 800  # launches queued at once on the load's stream (graph replays of several products each)


def step_ms(run: Callable[[], Any], iters: int, stream: torch.cuda.Stream | None) -> float:
    """Milliseconds per decode step: ``run`` (a replay), then a host sync of the decode's stream only, as the
    scheduler's end-of-sequence check does; one warm-up step first."""

    def once() -> None:
        if stream is None:
            run()
            return
        with torch.cuda.stream(stream):
            run()
        stream.synchronize()

    once()
    start = time.perf_counter()
    for _ in range(iters):
        once()
    return (time.perf_counter() - start) / iters * 1e3


class GemmLoad:
    """Prefill-sized matrix products queued on a side stream of the default (lowest) priority (CUDA), or run in a
    thread (CPU)."""

    def __init__(self, tokens: int, hidden: int, intermediate: int, device: str, dtype: torch.dtype) -> None:
        self.a = torch.randn(tokens, hidden, device=device, dtype=dtype)
        self.b = torch.randn(hidden, intermediate, device=device, dtype=dtype)
        self.c = torch.empty(tokens, intermediate, device=device, dtype=dtype)
        self.cuda = device == "cuda"
        self.stream = torch.cuda.Stream() if self.cuda else None
        self._graph_of: dict[int, torch.cuda.CUDAGraph] = {}  # products per graph -> its graph

    def product(self) -> None:
        torch.mm(self.a, self.b, out=self.c)

    def ms(self, iters: int = 10) -> float:
        """One product's milliseconds, alone."""
        self.product()
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            self.product()
        sync()
        return (time.perf_counter() - start) / iters * 1e3

    @contextmanager
    def beside(self, window_ms: float, alone_ms: float, out: dict[str, Any]) -> Iterator[None]:
        """Keep the products running for at least ``window_ms`` while the body runs; ``out`` gets whether they
        outlasted the body (``load_covered``) and their milliseconds each meanwhile (``gemm_ms``)."""
        if not self.cuda:
            start = time.perf_counter()
            with looping(self.product) as count:
                yield
            out["load_covered"] = True
            out["gemm_ms"] = (time.perf_counter() - start) / max(count[0], 1) * 1e3
            return
        assert self.stream is not None
        # Twice the expected window, queued without blocking the host: the products are captured once as a CUDA
        # graph of `per` products, and the graph is replayed at most QUEUED times (one launch each). Launching the
        # products one by one filled the stream's launch queue (a product is several kernels), so the host blocked
        # while queueing them and they had mostly run before the body started (the first H100 reading).
        needed = math.ceil(2 * window_ms / alone_ms) + 8
        per = math.ceil(needed / QUEUED)
        graph = self._graph(per)
        replays = math.ceil(needed / per)
        self.stream.wait_stream(torch.cuda.current_stream())
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            begin.record(self.stream)
            for _ in range(replays):
                graph.replay()
            end.record(self.stream)
        try:
            yield
        finally:
            out["load_covered"] = not end.query()  # still running when the body ended
            end.synchronize()
            out["gemm_ms"] = begin.elapsed_time(end) / (replays * per)  # per product, over the whole queue
            out["products_queued"] = replays * per

    def _graph(self, per: int) -> torch.cuda.CUDAGraph:
        """A CUDA graph of ``per`` products (captured once per size)."""
        if per not in self._graph_of:
            graph = torch.cuda.CUDAGraph()
            self.product()  # warm-up outside the capture (cuBLAS workspace)
            sync()
            with torch.cuda.graph(graph):
                for _ in range(per):
                    self.product()
            self._graph_of[per] = graph
        return self._graph_of[per]


@contextmanager
def looping(work: Callable[[], None]) -> Iterator[list[int]]:
    """Run ``work`` over and over in a thread while the body runs; yields ``[times it ran]``, final on exit."""
    stop, count = threading.Event(), [0]

    def loop() -> None:
        while not stop.is_set():
            work()
            count[0] += 1

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield count
    finally:
        stop.set()
        thread.join()


@contextmanager
def gil_load(device: str) -> Iterator[None]:
    """A Python thread launching small kernels in a loop on a side stream: host and GIL load, little GPU load."""
    x = torch.zeros(1024, device=device)
    stream = torch.cuda.Stream() if device == "cuda" else None

    def launch() -> None:
        if stream is None:
            x.add_(1)
            return
        with torch.cuda.stream(stream):
            for _ in range(64):
                x.add_(1)
        stream.synchronize()

    with looping(launch):
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3_vl_4b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iters", type=int, default=60, help="decode steps timed per condition")
    parser.add_argument("--rows", type=int, default=128, help="single-sample rows of the bucket (Stage-A's)")
    parser.add_argument("--prompt-bucket", type=int, default=1024)
    parser.add_argument(
        "--gemm-tokens", type=int, default=16384, help="rows of each product (a prefill chunk's)"
    )
    parser.add_argument(
        "--switch-interval", type=float, default=5e-4, help="seconds, for the gil_switch condition"
    )
    parser.add_argument("--out", default=None, help="JSON results")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    bundle = random_bundle(args.preset, args.device, dtype=dtype)
    engine = GenerationEngine(
        bundle.model,
        bundle.processor,
        max_rows=args.rows,
        prompt_slots=args.rows,
        max_prompt_len=args.prompt_bucket,
        max_new_tokens=128,
    )
    warm = [[{"role": "user", "content": "这张图片里有几个BBU设备？"}]] * 4
    engine.generate(warm, SamplingParams(max_new_tokens=4))  # the pool, the step's buffers, a first graph
    step = engine.decode_step
    assert step is not None
    bucket = Bucket(args.rows, 1, args.prompt_bucket, 128)
    text = bundle.model.config.get_text_config()
    gemm = GemmLoad(args.gemm_tokens, text.hidden_size, text.intermediate_size, args.device, dtype)
    result: dict[str, Any] = {"config": vars(args), "device": device_info(), "bucket": str(bucket)}
    result["gemm_alone_ms"] = alone_gemm = gemm.ms()
    main_stream = torch.cuda.current_stream() if cuda else None
    ms: dict[str, float] = {}
    ms["alone"] = step_ms(lambda: step.run(bucket), args.iters, main_stream)
    window = 3 * args.iters * ms["alone"]  # the step may slow ~2.5x beside the products
    loads: dict[str, dict[str, Any]] = {"gemm": {}, "priority_gemm": {}}
    with gemm.beside(window, alone_gemm, loads["gemm"]):
        ms["gemm"] = step_ms(lambda: step.run(bucket), args.iters, main_stream)
    with gil_load(args.device):
        ms["gil"] = step_ms(lambda: step.run(bucket), args.iters, main_stream)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(args.switch_interval)
    try:
        with gil_load(args.device):
            ms["gil_switch"] = step_ms(lambda: step.run(bucket), args.iters, main_stream)
    finally:
        sys.setswitchinterval(previous)
    if cuda:
        _, highest = torch.cuda.Stream.priority_range()
        high = torch.cuda.Stream(priority=highest)
        high.wait_stream(torch.cuda.current_stream())
        other = Bucket(args.rows, 1, args.prompt_bucket, 64)  # captured under the high priority
        ms["priority_alone"] = step_ms(lambda: step.run(other), args.iters, high)
        with gemm.beside(window, alone_gemm, loads["priority_gemm"]):
            ms["priority_gemm"] = step_ms(lambda: step.run(other), args.iters, high)
        result["priority"] = high.priority
    else:
        result["priority"] = "skipped: no CUDA streams"
    sync()
    result["step_ms"] = ms
    result["loads"] = loads
    for name, value in ms.items():
        print(f"decode step, {name}: {value:.2f} ms")
    print(f"matrix product alone: {alone_gemm:.2f} ms; beside the steps: {loads}")
    write(args.out, result)


if __name__ == "__main__":
    main()
