"""Continuous batching over the KV pool: finished prompts free their slot for waiting ones.

One :meth:`ContinuousBatcher.run` call serves one ``generate`` call. Prompts wait in a queue (longest first,
so the length bucket shrinks as the call goes on); whenever slots are free, a chunk of waiting prompts is
prefilled (eagerly, at most ``max_prefill_tokens`` padded tokens at a time) into the lowest free slots and its
G sample rows start decoding beside the rows already running. Once rows are running, prompts are admitted when a
quarter of the slots are free, or when every waiting prompt fits. A slot is freed when all its G rows have ended
(end-of-sequence or ``max_new_tokens``), so Stage-A summaries and eval answers of different lengths do not
wait for the longest one, and a batch larger than the pool is queued, not refused. The G rows of a prompt
come from the same weights: a call never spans an optimiser step, so GRPO's semantics hold.

With ``chunk_tokens`` (``generation.prefill_chunk_tokens``) prompts are not prefilled whole: a free slot takes a
waiting prompt at once, the prompt is prepared (vision tower, embeddings; about two steps' worth of prompt tokens
kept ready), and each step carries up to ``chunk_tokens`` of the admitted prompts' tokens beside the running rows
(:mod:`~bbuqc_lightning.generation.chunked_prefill`); a prompt's rows start the step after its last token ran.

With ``overlap`` (``generation.overlap_prefill``) whole-prompt prefills no longer stop the running rows: once rows
are running, a chunk of waiting prompts is *launched* into reserved slots, its prefill running beside the next
decode steps (a side CUDA stream, a worker thread: :mod:`~bbuqc_lightning.generation.overlap`), and its rows start
at the first loop turn after the prefill is done. One admission is in flight at a time; it lands before the call
returns, so a call never leaves one to the next.

A call may also hand the *next* call's prompts ``ahead`` (Stage-A does, one predict batch ahead): they wait behind
the call's own prompts and fill the slots its last prompts leave, so a call no longer ends in a wave of rows
waiting for the longest one. The call returns as soon as its own prompts are done; what it started is kept
(waiting, in flight or done) for the next call, which must ask for those prompts by the same keys with the same
settings, else it is dropped.

Row ``r`` belongs to slot ``r // G``; the decode step runs the rows of the lowest ``slots`` slots, ``slots``
rounded up to a power of two (:class:`~bbuqc_lightning.generation.decode_step.Bucket`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from bbuqc_lightning.generation.chunked_prefill import Prepared
from bbuqc_lightning.generation.decode_step import Bucket, DecodeStep
from bbuqc_lightning.generation.overlap import Flight, Overlap
from bbuqc_lightning.generation.sampling import Sampler

# Prefill(requests) -> (first logits (n, V) fp32, first decode positions (n,), per-layer (keys, values))
Prefill = Callable[
    [list["Request"]], tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]
]
# Prepare(requests) -> what chunked prefill needs of each prompt (:func:`~.chunked_prefill.prepare`)
Prepare = Callable[[list["Request"]], list[Prepared]]


@dataclass
class Request:
    """One prompt: its own (unpadded, batch of one) processor outputs."""

    index: int
    inputs: dict[str, torch.Tensor]
    length: int
    name: str
    key: Hashable | None = None  # the prompt's identity across calls (prompts handed ahead); None: its index

    @property
    def ident(self) -> Hashable:
        return ("#", self.index) if self.key is None else self.key


@dataclass
class SchedulerStats:
    """Where the pool's time went since the batcher was built: host wall seconds (each prefill and decode step
    ends in a host synchronisation, so they are GPU time too) and counts. ``occupancy`` is the share of the
    decode steps' rows that were running (the rest: ended rows waiting for their group, or bucket padding)."""

    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prefills: int = 0
    prompts: int = 0
    prompt_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0
    running_rows: int = 0
    # chunked prefill: steps that carried prompt tokens and their time, also counted as decode steps and decode
    # time when rows ran beside them, as prefill time when not (preparing prompts is prefill time too)
    mixed_steps: int = 0
    mixed_seconds: float = 0.0
    # overlapped prefill: admissions launched beside running rows, the decode steps that ran while one was in
    # flight, the caller's time blocked waiting for one (also prefill time, like launching and starting them),
    # and the worker thread's wall time for their prefills (not prefill time: it overlapped the decode steps).
    # Admissions with no row running are prefilled by the worker too, but waited for at once: prefill time alone.
    overlapped_prefills: int = 0
    overlapped_steps: int = 0
    overlap_wait_seconds: float = 0.0
    overlap_worker_seconds: float = 0.0

    def count_prefill(self, requests: Sequence[Request]) -> None:
        """Prompts prefilled (or prepared, with chunked prefill) together."""
        self.prefills += 1
        self.prompts += len(requests)
        self.prompt_tokens += sum(r.length for r in requests)

    def count_step(self, rows: int, finished: torch.Tensor) -> None:
        """A decode step over ``rows`` rows, those not ``finished`` running."""
        self.decode_steps += 1
        self.decode_rows += rows
        self.running_rows += int((~finished[:rows]).sum())

    @property
    def occupancy(self) -> float:
        return self.running_rows / self.decode_rows if self.decode_rows else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "occupancy": self.occupancy}


@dataclass
class _Slot:
    request: Request
    prepared: Prepared | None = None  # chunked prefill: the prompt is still entering the pool
    pending: bool = False  # overlapped prefill: the slot is reserved, its prompt's prefill in flight


@dataclass
class _Admission:
    """Prompts whose prefill is in flight (overlapped prefill), into the reserved slots ``chosen``."""

    chunk: list[Request]
    chosen: list[int]
    flight: Flight
    beside: bool  # launched beside running rows (else landed at once: no row to overlap with)


@dataclass
class _Call:
    """What every step of one :meth:`ContinuousBatcher.run` call needs: its settings and the rows' state."""

    group: int  # sample rows per prompt (G)
    sample: Sampler
    eos: torch.Tensor  # end-of-sequence ids (device)
    max_new_tokens: int
    finished: torch.Tensor  # the session's host copy; free rows count as finished
    ended_at_start: bool = False  # a row started since the last collect ended at its first token


@dataclass
class _Session:
    """The scheduling state of a call, kept for the next one when prompts were handed ahead."""

    signature: object  # what the next call must match to continue it (None: never continued)
    sample: Sampler
    waiting: deque[Request]
    slots: list[_Slot | None]
    finished: torch.Tensor  # host copy; free rows count as finished
    results: dict[Hashable, list[list[int]]] = field(default_factory=dict)

    def keys(self) -> set[Hashable]:
        started = {slot.request.ident for slot in self.slots if slot is not None}
        return {r.ident for r in self.waiting} | started | set(self.results)


class PromptTooLongError(ValueError):
    """A prompt longer than ``generation.max_prompt_len``; ``index`` is its position in the call."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


OVERLAP_WITH_CHUNKS = (
    "generation.overlap_prefill and generation.prefill_chunk_tokens cannot be combined: chunked prefill already "
    "runs prompt tokens inside the decode steps, overlapped prefill runs whole prompts beside them; set one"
)
PRIORITY_WITHOUT_OVERLAP = (
    "generation.overlap_decode_priority and generation.overlap_switch_interval tune decode steps against prefills "
    "running beside them; they need generation.overlap_prefill=true"
)


def check_overlap_settings(
    overlap: bool, chunk_tokens: int | None, decode_priority: bool, switch_interval: float | None
) -> None:
    """The overlapped-prefill settings go together: not with chunked prefill, its tuning only with it, and a
    positive switch interval. Checked where the engine is built and where its batcher is."""
    if overlap and chunk_tokens is not None:
        raise ValueError(OVERLAP_WITH_CHUNKS)
    if (decode_priority or switch_interval is not None) and not overlap:
        raise ValueError(PRIORITY_WITHOUT_OVERLAP)
    if switch_interval is not None and switch_interval <= 0:
        raise ValueError(
            f"generation.overlap_switch_interval must be > 0 seconds or null, got {switch_interval}"
        )


def _running(finished: torch.Tensor, rows: int) -> bool:
    """Whether any of the first ``rows`` rows is still decoding (``finished`` is the host copy)."""
    return bool((~finished[:rows]).any())


def next_bucket(value: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= value (``buckets`` ascending, the last one the maximum)."""
    for bucket in buckets:
        if bucket >= value:
            return bucket
    return buckets[-1]


def power_of_two_buckets(limit: int) -> list[int]:
    """1, 2, 4, ... up to ``limit`` (``limit`` itself last when it is not a power of two)."""
    out = [1]
    while out[-1] * 2 < limit:
        out.append(out[-1] * 2)
    return sorted({*out, limit})


class ContinuousBatcher:
    """The scheduling loop over a :class:`DecodeStep` and its pool."""

    def __init__(
        self,
        step: DecodeStep,
        prefill: Prefill,
        length_buckets: Sequence[int],
        max_prefill_tokens: int,
        prepare: Prepare | None = None,
        chunk_tokens: int | None = None,
        overlap: bool = False,
        decode_priority: bool = False,
        switch_interval: float | None = None,
    ) -> None:
        if chunk_tokens is not None and (prepare is None or chunk_tokens < 1):
            raise ValueError(
                f"chunked prefill needs a prepare function and chunk_tokens >= 1, got {chunk_tokens}"
            )
        check_overlap_settings(overlap, chunk_tokens, decode_priority, switch_interval)
        self.step = step
        self.prefill = prefill
        self.prepare = prepare
        self.chunk_tokens = chunk_tokens
        self.layout = step.pool.layout
        self.length_buckets = sorted(b for b in length_buckets if b < self.layout.max_prompt_len)
        self.length_buckets.append(self.layout.max_prompt_len)
        self.max_prefill_tokens = max_prefill_tokens
        device = step.tokens.device
        self.stats = SchedulerStats()
        self.offsets = torch.zeros(self.layout.rows, dtype=torch.long, device=device)
        self.out = torch.zeros(self.layout.rows, self.layout.max_new_tokens, dtype=torch.long, device=device)
        self.session: _Session | None = None  # what the last call left for the next one
        self.overlap = Overlap(device, decode_priority, switch_interval) if overlap else None
        self._admission: _Admission | None = None  # overlapped prefill: the admission in flight
        self.dropped = 0  # prompts handed ahead that no call asked for (dropped with their session)

    @torch.no_grad()
    def run(
        self,
        requests: Sequence[Request],
        group: int,
        max_new_tokens: int,
        sample: Sampler,
        eos_token_ids: Sequence[int],
        ahead: Sequence[Request] = (),
        signature: object = None,
    ) -> list[list[list[int]]]:
        """Token ids per request, ``group`` lists each (end-of-sequence token kept, no padding).

        ``ahead``: the next call's prompts (with keys), started once this call's are all admitted and kept for
        the next call; ``signature`` (the settings: group, budget, sampling) must then be the same in both calls,
        and the next call must ask for every prompt kept, else the kept work is dropped.
        """
        self._check(requests, group, max_new_tokens)
        capacity = min(self.layout.prompt_slots, self.layout.rows // group)
        slot_buckets = power_of_two_buckets(capacity)
        new_bucket = next_bucket(max_new_tokens, power_of_two_buckets(self.layout.max_new_tokens))
        eos = torch.tensor(list(eos_token_ids), device=self.out.device)
        wanted = [r.ident for r in requests]
        session = self._continue(signature, wanted, capacity)
        if session is None:
            with torch.inference_mode(False):  # kept for a next call, which may run outside inference mode
                finished = torch.ones(self.layout.rows, dtype=torch.bool)
            session = _Session(signature, sample, deque(), [None] * capacity, finished)
        known = session.keys()
        # this call's prompts first, longest first (the length bucket shrinks as the call goes on), then the next
        # call's; a prompt handed ahead that is too long waits for its own call, which reports it
        mine = [*session.waiting, *(r for r in requests if r.ident not in known)]
        later = [r for r in ahead if r.ident not in known and r.length <= self.layout.max_prompt_len]
        session.waiting = deque(
            [*sorted(mine, key=lambda r: -r.length), *sorted(later, key=lambda r: -r.length)]
        )
        # ended_at_start: rows the last call started for this one (handed ahead) may have ended at their first token
        call = _Call(group, session.sample, eos, max_new_tokens, session.finished, ended_at_start=True)
        needed = set(wanted)
        try:
            with self.overlap.call() if self.overlap is not None else contextlib.nullcontext():
                self._serve(session, needed, call, capacity, slot_buckets, new_bucket)
        except BaseException:
            # the next call's prompts kept so far go with the error
            self.dropped += len(session.keys() - needed)
            raise
        out = [session.results.pop(key) for key in wanted]
        self.session = session if session.keys() else None
        return out

    def _serve(
        self,
        session: _Session,
        needed: set[Hashable],
        call: _Call,
        capacity: int,
        slot_buckets: Sequence[int],
        new_bucket: int,
    ) -> None:
        """The scheduling loop of one call: until every prompt in ``needed`` has its results."""
        waiting, slots, finished, group = session.waiting, session.slots, session.finished, call.group
        try:
            while not needed <= session.results.keys():
                if self.chunk_tokens is not None:  # prompts enter a chunk at a time, inside the decode steps
                    free = [i for i, s in enumerate(slots) if s is None]
                    if waiting and free:
                        self._admit_chunked(waiting, free, slots)
                    if any(s is not None and s.prepared is not None for s in slots):
                        start = time.perf_counter()
                        running = _running(finished, capacity * group)
                        bucket = self._bucket(slots, group, slot_buckets, new_bucket) if running else None
                        ended = self._mixed(bucket, slots, call)
                        seconds = time.perf_counter() - start
                        self.stats.mixed_steps += 1
                        self.stats.mixed_seconds += seconds
                        if bucket is None:  # prompt tokens alone: prefill time
                            self.stats.prefill_seconds += seconds
                        else:
                            self.stats.decode_seconds += seconds
                        if ended:
                            self._collect(slots, call, session.results)
                        continue
                else:
                    bucket_now = functools.partial(self._bucket, slots, group, slot_buckets, new_bucket)
                    self._admit_whole(waiting, slots, call, capacity, bucket_now)
                running = _running(finished, capacity * group)
                if call.ended_at_start or not running:
                    # a prompt whose rows all ended at their first token frees its slot now, not when another
                    # row ends (collecting ended rows leaves the running ones); with no row running there is no
                    # step to take
                    call.ended_at_start = False
                    self._collect(slots, call, session.results)
                    if not running:
                        continue
                bucket = self._bucket(slots, group, slot_buckets, new_bucket)
                if self._admission is not None and self.step.warms_up(bucket):
                    # a bucket's first run (graph capture, compiles) never overlaps a prefill: capturing forbids
                    # unsafe CUDA calls from every thread
                    self._land(slots, call)
                    bucket = self._bucket(slots, group, slot_buckets, new_bucket)
                start = time.perf_counter()
                self.stats.count_step(bucket.rows, finished)
                ended = self._advance(bucket, self.step.run(bucket), call)
                self.stats.decode_seconds += time.perf_counter() - start
                if self._admission is not None:
                    self._admission.flight.steps += 1
                    self.stats.overlapped_steps += 1
                if ended:
                    self._collect(slots, call, session.results)
            if self._admission is not None:  # prompts handed ahead: their rows start before the call returns
                self._land(slots, call)
        finally:
            admission, self._admission = self._admission, None
            if admission is not None:  # an error ended the call: no prefill runs on after it
                assert self.overlap is not None
                self.overlap.abandon(admission.flight)

    def close(self) -> None:
        """Stop the overlapped prefill's worker thread, if any (it is also stopped when the batcher is collected)."""
        if self.overlap is not None:
            self.overlap.close()

    def _continue(self, signature: object, wanted: Sequence[Hashable], capacity: int) -> _Session | None:
        """The last call's session when this call continues it, else None (its kept work dropped)."""
        session, self.session = self.session, None
        if session is None:
            return None
        if (
            signature is not None
            and session.signature == signature
            and len(session.slots) == capacity
            and session.keys() <= set(wanted)
        ):
            return session
        self.dropped += len(session.keys())
        for i, slot in enumerate(session.slots):  # free the slots: their rows stop counting as running
            if slot is not None:
                self.step.prompt_lens[i] = 0
        return None

    def _check(self, requests: Sequence[Request], group: int, max_new_tokens: int) -> None:
        if group > self.layout.rows:
            raise ValueError(
                f"generation: {group} samples per prompt exceed generation.max_rows={self.layout.rows}"
            )
        if max_new_tokens > self.layout.max_new_tokens:
            raise ValueError(
                f"generation: max_new_tokens={max_new_tokens} exceeds the pool's "
                f"generation.max_new_tokens={self.layout.max_new_tokens}; raise it in conf/generation"
            )
        for request in requests:
            if request.length > self.layout.max_prompt_len:
                raise PromptTooLongError(
                    f"generation: prompt {request.name} has {request.length} tokens, more than "
                    f"generation.max_prompt_len={self.layout.max_prompt_len}; raise it (the KV pool then "
                    "holds fewer prompts at once) or shorten the prompt",
                    request.index,
                )

    def _bucket(
        self, slots: list[_Slot | None], group: int, slot_buckets: Sequence[int], new_bucket: int
    ) -> Bucket:
        """The decode step's shape for the occupied slots (reserved ones left out: their rows have not started)."""
        started = [(i, s) for i, s in enumerate(slots) if s is not None and not s.pending]
        top = max(i for i, _ in started) + 1
        longest = max(s.request.length for _, s in started)
        return Bucket(
            slots=next_bucket(top, slot_buckets),
            group=group,
            prompt_bucket=next_bucket(longest, self.length_buckets),
            new_bucket=new_bucket,
        )

    def _admit_chunked(self, waiting: deque[Request], free: list[int], slots: list[_Slot | None]) -> None:
        """Give waiting prompts free slots and prepare them (vision tower, embeddings, positions), keeping about
        two steps' worth of prompt tokens ready: a step never waits for a whole queue of photos to be encoded."""
        assert self.prepare is not None and self.chunk_tokens is not None
        pending = sum(s.prepared.remaining for s in slots if s is not None and s.prepared is not None)
        chunk: list[Request] = []
        while waiting and len(chunk) < len(free) and pending < 2 * self.chunk_tokens:
            chunk.append(waiting.popleft())
            pending += chunk[-1].length
        if not chunk:
            return
        start = time.perf_counter()
        prepared = self.prepare(chunk)
        self.stats.prefill_seconds += time.perf_counter() - start
        self.stats.count_prefill(chunk)
        for slot, request, ready in zip(free, chunk, prepared, strict=False):
            slots[slot] = _Slot(request, prepared=ready)

    def _mixed(self, bucket: Bucket | None, slots: list[_Slot | None], call: _Call) -> bool:
        """One step of the running rows (if any) with up to ``chunk_tokens`` prompt tokens; prompts whose last
        token ran start their rows. True when a row ended."""
        assert self.chunk_tokens is not None
        segments, budget = [], self.chunk_tokens
        for index, slot in enumerate(slots):
            if budget and slot is not None and slot.prepared is not None:
                segments.append(slot.prepared.segment(index, budget))
                budget -= segments[-1].n
        logits, firsts = self.step.run_mixed(bucket, segments)
        ended = False
        if bucket is not None and logits is not None:
            self.stats.count_step(bucket.rows, call.finished)
            ended = self._advance(bucket, logits, call)
        done = [s.slot for s in segments if s.last]
        if done:
            requests = []
            offsets = []
            for index in done:
                slot = slots[index]
                assert slot is not None and slot.prepared is not None
                requests.append(slot.request)
                offsets.append(slot.prepared.first_position)
                slot.prepared = None
            device = self.out.device
            self._start(requests, done, torch.stack(firsts), torch.tensor(offsets, device=device), call)
            group = call.group
            ended = ended or bool(call.finished[[i * group + g for i in done for g in range(group)]].any())
        return ended

    def _admit_whole(
        self,
        waiting: deque[Request],
        slots: list[_Slot | None],
        call: _Call,
        capacity: int,
        bucket_now: Callable[[], Bucket],
    ) -> None:
        """Whole-prompt prefill: land the admission in flight (overlapped prefill) once it is done, or at once when
        no row runs beside it; then admit waiting prompts if enough slots are free. ``bucket_now``: the next decode
        step's bucket; when that step is the bucket's first run, a launch waits a turn (the step would land it at
        once, before any step ran beside it)."""
        running = _running(call.finished, capacity * call.group)
        if self._admission is not None:
            assert self.overlap is not None
            if running and not self.overlap.ready(self._admission.flight):
                return  # one admission in flight at a time
            self._land(slots, call)
            running = _running(call.finished, capacity * call.group)
        free = [i for i, s in enumerate(slots) if s is None]
        # Prefill in chunks worth stalling the running rows for (a quarter of the slots), or the last waiting
        # prompts at once: the tail of a call must not wait for a whole generation to free slots.
        if not (waiting and free and len(free) >= min(len(waiting), max(1, capacity // 4))):
            return
        if self.overlap is not None and running and self.step.warms_up(bucket_now()):
            return  # launched now, it would be landed before the step's capture, beside no step: next turn
        start = time.perf_counter()
        if self.overlap is None:
            self._admit(waiting, free, slots, call)
        else:
            self._launch(waiting, free, slots, beside=running)
        self.stats.prefill_seconds += time.perf_counter() - start
        if self.overlap is not None and not running:
            # no row to overlap with (the call's start, or every row ended): wait for it now. Still prefilled by
            # the worker on the side stream, so its transient memory is cached for one stream, not for two.
            self._land(slots, call)

    def _take(self, waiting: deque[Request], free: list[int]) -> list[Request]:
        """The next chunk of waiting prompts: at most one per free slot and ``max_prefill_tokens`` padded tokens."""
        chunk = [waiting.popleft()]
        # the chunk pads to its longest prompt (the queue is sorted longest first per call, not across calls)
        width = chunk[0].length
        while waiting and len(chunk) < len(free):
            if (len(chunk) + 1) * max(width, waiting[0].length) > self.max_prefill_tokens:
                break
            chunk.append(waiting.popleft())
            width = max(width, chunk[-1].length)
        return chunk

    def _prefill_into(self, chunk: list[Request], chosen: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill ``chunk`` and copy its keys/values into the slots ``chosen``: first logits and positions."""
        logits, offsets, layer_kv = self.prefill(chunk)
        self.step.pool.store_prompts(layer_kv, [r.length for r in chunk], chosen)
        return logits, offsets

    def _admit(
        self, waiting: deque[Request], free: list[int], slots: list[_Slot | None], call: _Call
    ) -> None:
        chunk = self._take(waiting, free)
        chosen = free[: len(chunk)]
        logits, offsets = self._prefill_into(chunk, chosen)
        self.stats.count_prefill(chunk)
        self._start(chunk, chosen, logits, offsets, call)
        for slot, request in zip(chosen, chunk, strict=True):
            slots[slot] = _Slot(request)

    def _launch(
        self, waiting: deque[Request], free: list[int], slots: list[_Slot | None], beside: bool
    ) -> None:
        """Overlapped prefill: take a chunk as :meth:`_admit` does and start its prefill beside the decode steps.

        Its slots are reserved (``pending``): no later admission takes them, :meth:`_collect` and the bucket skip
        them, and their rows stay finished, so decode steps sample nothing for them. Their ``prompt_lens`` stay 0
        until :meth:`_start` (on the main stream, after the prefill's event): a decode step whose bucket covers a
        reserved slot reads its prompt keys while the side stream writes them, all masked
        (:mod:`~bbuqc_lightning.generation.overlap` says why that is safe)."""
        assert self.overlap is not None
        chunk = self._take(waiting, free)
        chosen = free[: len(chunk)]
        self.step.prompt_lens[chosen] = 0  # 0 already for a freed slot: explicit, queued before the launch
        for slot, request in zip(chosen, chunk, strict=True):
            slots[slot] = _Slot(request, pending=True)
        self.stats.count_prefill(chunk)
        self.stats.overlapped_prefills += beside
        flight = self.overlap.launch(lambda: self._prefill_into(chunk, chosen))
        self._admission = _Admission(chunk, chosen, flight, beside)

    def _land(self, slots: list[_Slot | None], call: _Call) -> None:
        """The admission in flight is done (or must be waited for): its rows start."""
        assert self.overlap is not None and self._admission is not None
        admission = self._admission
        start = time.perf_counter()
        logits, offsets = self.overlap.land(admission.flight)
        self._admission = None  # landed: nothing left running on the side stream
        self._start(admission.chunk, admission.chosen, logits, offsets, call)
        for slot, request in zip(admission.chosen, admission.chunk, strict=True):
            slots[slot] = _Slot(request)
        self.stats.prefill_seconds += time.perf_counter() - start
        if admission.beside:
            self.stats.overlap_wait_seconds += admission.flight.wait_seconds
            self.stats.overlap_worker_seconds += admission.flight.worker_seconds

    def _start(
        self,
        chunk: list[Request],
        chosen: list[int],
        logits: torch.Tensor,
        offsets: torch.Tensor,
        call: _Call,
    ) -> None:
        """The first token of each prompt's G rows from its last prompt token's ``logits``; rows start."""
        device, group = self.out.device, call.group
        slot_index = torch.tensor(chosen, device=device)
        rows = (slot_index[:, None] * group + torch.arange(group, device=device)).reshape(-1)
        zeros = torch.zeros(len(rows), dtype=torch.long, device=device)
        first = call.sample(logits.repeat_interleave(group, dim=0), zeros)
        self.step.prompt_lens[slot_index] = torch.tensor([r.length for r in chunk], device=device)
        self.offsets[rows] = offsets.to(device).repeat_interleave(group)
        self.step.tokens[rows] = first
        self.step.steps[rows] = zeros
        self.step.positions[rows] = self.offsets[rows]
        self.out[rows, 0] = first
        done = torch.isin(first, call.eos) | (call.max_new_tokens <= 1)
        ended = done.cpu()
        call.finished[rows.cpu()] = ended
        call.ended_at_start = call.ended_at_start or bool(ended.any())

    def _advance(self, bucket: Bucket, logits: torch.Tensor, call: _Call) -> bool:
        """Sample the running rows' next tokens from ``logits`` (a decode step's, or a mixed step's decode
        rows'); True when a row ended."""
        rows, finished = bucket.rows, call.finished
        steps = self.step.steps[:rows]
        nxt = call.sample(logits, steps + 1)
        running = (~finished[:rows]).to(nxt.device)
        new_steps = torch.where(running, steps + 1, steps)
        index = torch.arange(rows, device=nxt.device)
        keep = self.out[index, new_steps]
        self.out[index, new_steps] = torch.where(running, nxt, keep)
        self.step.tokens[:rows] = torch.where(running, nxt, self.step.tokens[:rows])
        self.step.steps[:rows] = new_steps
        self.step.positions[:rows] = self.offsets[:rows] + new_steps
        ended = running & (torch.isin(nxt, call.eos) | (new_steps + 1 >= call.max_new_tokens))
        if not bool(ended.any()):  # the step's one host synchronisation
            return False
        finished[:rows] |= ended.cpu()
        return True

    def _collect(
        self, slots: list[_Slot | None], call: _Call, results: dict[Hashable, list[list[int]]]
    ) -> None:
        """Hand back every slot whose rows have all ended, and free it."""
        group, finished = call.group, call.finished
        for i, slot in enumerate(slots):
            if (
                slot is None
                or slot.prepared is not None
                or slot.pending
                or not bool(finished[i * group : (i + 1) * group].all())
            ):
                continue
            rows = slice(i * group, (i + 1) * group)
            counts = (self.step.steps[rows] + 1).tolist()
            tokens = self.out[rows].tolist()
            results[slot.request.ident] = [ids[:n] for ids, n in zip(tokens, counts, strict=True)]
            self.step.prompt_lens[i] = 0
            slots[i] = None
            finished[rows] = True
