"""Overlapped prefill (``generation.overlap_prefill``): a chunk of prompts is prefilled while the running rows
keep decoding.

Without it, admitting prompts stops the running rows: the scheduler prefills a chunk of prompts (matrix products
over ~16 photos' tokens, the GPU busy) and only then replays the next decode step (a CUDA graph of many small
kernels that leaves most of the GPU idle). With it, once rows are running, the scheduler *launches* the
admission instead (:class:`~bbuqc_lightning.generation.scheduler.ContinuousBatcher`): it picks the prompts and
their free slots as before, reserves the slots, and the prefill plus the copy of its keys/values into the slots
run on a side CUDA stream while the decode steps go on on the caller's stream. The admission *lands* (its rows
start, first token sampled from the prefill's logits) at the first loop turn after the side stream's work is
done, which an event says without blocking.

Why a worker thread, not only a stream: the prefill's forward waits for the GPU several times (transformers'
Qwen3-VL vision attention calls ``lengths.tolist()`` in every vision layer; the image grid and position code
read tensors back too). Run on the caller's thread, each of those waits would hold the host until the side
stream caught up, and no decode step could be launched meanwhile. So :class:`Overlap` runs the prefill in one
worker thread (``ThreadPoolExecutor(max_workers=1)``, created at the first launch): the worker blocks on the
side stream's waits, the caller's thread keeps replaying decode steps. Blocking waits in PyTorch release the
GIL; the Python work of both threads (the prefill's module calls, the scheduler's per-step bookkeeping) still
takes turns on it.

Thread-local state the worker must copy from the caller: the current stream and device (set explicitly: the
side stream, on the pool's device), grad mode, inference mode and autocast (:func:`_caller_modes`). Model state:
the prefill alone touches Qwen3-VL's cached ``rope_deltas``; the decode step reads positions from its own
buffers, never that cache, and calls the decoder layers only (no vision tower), so the two threads share the
weights read-only. A decode bucket's first run (graph capture, compile) is never overlapped: the scheduler lands
the admission first (a capture in global mode forbids unsafe CUDA calls from every thread).

Stream ordering, on launch (caller's thread) and in the worker:

1. at launch the caller records an event on its current (main) stream, and the worker's first action is to
   make the side stream wait for it: the reserved slots were freed by the scheduler after the main stream's last
   read of them, so the side stream must not write them before the work the main stream had queued at launch
   (recorded at launch, not when the worker starts: the decode steps launched meanwhile need not be waited for);
2. the worker runs the prefill and the copy into the pool on the side stream, then records an event there;
3. the caller lands the admission: ``main.wait_event(event)``, so the main stream reads the slots, logits and
   offsets only after the side stream wrote them, and ``record_stream(main)`` on the logits and offsets the side
   stream allocated, so the caching allocator does not hand their memory to the side stream again while the main
   stream reads them. The wait costs nothing when the event has completed (the usual landing), and is what orders
   the streams when the caller lands early (a bucket's first run, a call's end, no row running): it then waits
   for the worker to have *queued* the side stream's work, not for the GPU to have run it.

Why the concurrent write into the pool is safe: decode steps write only the decode rows' keys/values, never a
prompt slot. They do read every slot below their bucket's top, reserved ones included, but a slot's prompt keys
are read by its own rows alone, and a reserved slot's rows are finished rows: the decode steps keep no token of
theirs. What those rows compute stays finite (the keys read are old or new, both finite), so no NaN reaches the
step's sampling or their decode keys; their prompt keys are masked besides (``prompt_lens`` stays 0 for a reserved
slot until its rows start, set on the main stream after the event), and their stale decode positions are
overwritten from position 0 once the rows start.

``decode_priority`` (``generation.overlap_decode_priority``): the scheduler's side of a call, decode steps
included, runs on a stream of the highest priority (:meth:`Overlap.decode_stream`), so the decode steps' small
kernels take the SMs a prefill's large ones free before the prefill's next ones do.

Measured on one H100 (docs/BENCHMARKS.md, eighth hold; Stage-A, 1,000 mixed photos): 1.02x, 1.03x with a 0.5 ms
switch interval, 0.92x with decode priority. Side by side the prefill slows from 29 to 39 s and the decode steps
from 19 to 37 ms: at 128 rows a decode step reads ~16 GB of prompt keys/values and nearly fills the GPU too, so the
overlap saves little GPU time. Hence off by default.

Greedy tokens are the default path's; sampled ones follow the same distribution but not the same draws for a seed:
an admission's rows start a few decode steps later, so the sampler's random numbers are consumed in another order.

On CPU (no streams) the prefill runs at launch on the caller's thread, and the admission is ready at once: its
rows start one decode step later, the same semantics. ``threaded=True`` runs the CPU prefill in the worker
too, and ``hold_steps`` keeps an admission in flight for that many decode steps: both for tests only, so a CPU
run goes through the deferred start and the worker.
"""

from __future__ import annotations

import contextlib
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

# The work of an admission: prefill its prompts and copy their keys/values into the reserved slots, returning the
# first logits (n, V) fp32 and first decode positions (n,).
Work = Callable[[], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Flight:
    """One admission's prefill, launched and not yet landed."""

    future: Future[tuple[torch.Tensor, torch.Tensor]] | None = None  # the worker's (threaded)
    result: tuple[torch.Tensor, torch.Tensor] | None = None  # prefilled on the caller's thread (CPU)
    event: torch.cuda.Event | None = None  # recorded on the side stream after the copy into the pool
    steps: int = 0  # decode steps run while in flight
    worker_seconds: float = 0.0  # the worker's wall time for the prefill (threaded)
    wait_seconds: float = 0.0  # the caller's time blocked waiting for it when it landed


class Overlap:
    """Runs admissions' prefills beside the decode steps: a side stream and one worker thread on CUDA."""

    def __init__(
        self, device: torch.device, decode_priority: bool = False, switch_interval: float | None = None
    ) -> None:
        """``decode_priority`` (``generation.overlap_decode_priority``): :meth:`decode_stream` runs the caller's
        work on a high-priority stream. ``switch_interval`` (``generation.overlap_switch_interval``, seconds):
        the interpreter's thread switch interval while a call runs (:meth:`call`); None leaves it alone
        (checked by the scheduler's ``check_overlap_settings``)."""
        self.device = device
        self.cuda = device.type == "cuda"
        self.decode_priority = decode_priority
        self.switch_interval = switch_interval
        self.threaded = self.cuda  # the prefill in the worker (tests set it on CPU too)
        self.hold_steps = 0  # tests only: decode steps an admission stays in flight however soon it is done
        self._executor: ThreadPoolExecutor | None = None
        self._stream: torch.cuda.Stream | None = None
        self._priority: torch.cuda.Stream | None = None

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """The context of one scheduler call: :meth:`decode_stream`, and the switch interval when set.

        Why the switch interval: the worker's Python (the prefill's module calls) and the caller's (each decode
        step's launch and bookkeeping) take turns on the GIL. A thread that wants the GIL asks its holder to drop
        it only after waiting the interpreter's switch interval (5 ms by default), so a caller back from a decode
        step's host sync may wait up to that long while the worker launches a prefill's kernels, once or more per
        decode step of ~20 ms. A shorter interval (``sys.setswitchinterval`` is process-wide) hands the GIL back
        sooner at the cost of more switches; it is set for the call alone and restored after."""
        previous = sys.getswitchinterval()
        if self.switch_interval is not None:
            sys.setswitchinterval(self.switch_interval)
        try:
            with self.decode_stream():
                yield
        finally:
            if self.switch_interval is not None:
                sys.setswitchinterval(previous)

    @contextlib.contextmanager
    def decode_stream(self) -> Iterator[None]:
        """With ``decode_priority`` on CUDA, run the body (a scheduler call: its decode steps, samplings, landings)
        on a stream of the highest priority, ordered after the caller's stream on entry and before it on exit;
        else do nothing.

        Why: in the first GPU reading decode steps took 34 ms instead of 20 while a prefill ran beside them, and
        the prefill itself barely slowed: the prefill's large matrix products hold the SMs, and the decode step's
        small kernels wait behind them. The block scheduler gives a higher-priority stream's waiting blocks the SMs
        as they free up, so the decode steps should keep most of their speed and the prefill take what is left.
        The prefill's side stream stays at the default (lowest) priority. Tensors the body allocates come from this
        stream's cache; the caller's stream waits for the body's work before it goes on."""
        if not (self.cuda and self.decode_priority):
            yield
            return
        if self._priority is None:
            _, highest = torch.cuda.Stream.priority_range()
            self._priority = torch.cuda.Stream(device=self.device, priority=highest)
        caller = torch.cuda.current_stream(self.device)
        self._priority.wait_stream(caller)
        try:
            with torch.cuda.stream(self._priority):
                yield
        finally:
            caller.wait_stream(self._priority)

    def launch(self, work: Work) -> Flight:
        """Start ``work``: in the worker on the side stream (threaded), else now."""
        if not self.threaded:
            return Flight(result=work())
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="overlap-prefill")
            weakref.finalize(self, self._executor.shutdown, wait=False)
        flight = Flight()
        launched = None
        if self.cuda:
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=self.device)
            launched = torch.cuda.Event()
            launched.record(torch.cuda.current_stream(self.device))
            flight.event = torch.cuda.Event()
        flight.future = self._executor.submit(self._work, work, flight, launched, _caller_modes())
        return flight

    def ready(self, flight: Flight) -> bool:
        """Whether ``flight`` can land without waiting (never blocks)."""
        if flight.steps < self.hold_steps:
            return False
        if flight.future is not None and not flight.future.done():
            return False
        return flight.event is None or flight.event.query()

    def land(self, flight: Flight) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill's logits and first positions, ready for the caller's stream (waits if it must)."""
        if flight.future is None:
            assert flight.result is not None
            return flight.result
        start = time.perf_counter()
        logits, offsets = flight.future.result()
        flight.wait_seconds = time.perf_counter() - start
        if flight.event is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(flight.event)
            for tensor in (logits, offsets):
                if tensor.is_cuda:
                    tensor.record_stream(main)
        return logits, offsets

    def abandon(self, flight: Flight) -> None:
        """Wait for ``flight``'s worker and drop its result (an error elsewhere ends the call): no prefill may run
        on after the call has returned."""
        if flight.future is not None:
            with contextlib.suppress(Exception):
                flight.future.result()
        if self._stream is not None:  # the event may never have been recorded (the prefill raised)
            self._stream.synchronize()

    def close(self) -> None:
        """Stop the worker thread (a later launch starts a new one)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _work(
        self,
        work: Work,
        flight: Flight,
        launched: torch.cuda.Event | None,
        modes: Callable[[contextlib.ExitStack], None],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The worker's side: the caller's modes, the side stream after the main stream's work queued at launch,
        the prefill, then the event."""
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            modes(stack)
            if launched is not None:
                assert self._stream is not None and flight.event is not None
                stack.enter_context(torch.cuda.device(self.device))
                stack.enter_context(torch.cuda.stream(self._stream))
                self._stream.wait_event(launched)
            out = work()
            if launched is not None:
                flight.event.record(self._stream)
        flight.worker_seconds = time.perf_counter() - start
        return out


def _caller_modes() -> Callable[[contextlib.ExitStack], None]:
    """The calling thread's grad mode, inference mode and autocast (thread-local in PyTorch), to enter in the
    worker: the prefill must build the same tensors (inference tensors under Lightning's predict loop, no graph)
    and run in the same precision as it would on the caller's thread."""
    grad = torch.is_grad_enabled()
    inference = torch.is_inference_mode_enabled()
    cache = torch.is_autocast_cache_enabled()
    autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cuda", "cpu") if torch.is_autocast_enabled(d)]

    def enter(stack: contextlib.ExitStack) -> None:
        stack.enter_context(torch.inference_mode(inference))
        stack.enter_context(torch.set_grad_enabled(grad))
        for device_type, dtype in autocast:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=cache))

    return enter
