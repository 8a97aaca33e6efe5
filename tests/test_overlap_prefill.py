"""Overlapped prefill (``generation.overlap_prefill``): once rows are running, whole-prompt prefills are launched
beside the decode steps and their rows start later, and the greedy tokens stay HF ``generate``'s: text prompts of
many lengths through fewer slots than prompts with rows ending early, photos, G samples of a prompt, prompts
handed ahead to the next call. On CPU the prefill runs at launch; the tests also hold admissions in flight for
several decode steps and run the prefill in the worker thread, so the deferred start is exercised here too, and
check the worker's modes, an error on either thread, and that no decode bucket warms up beside a prefill."""

from __future__ import annotations

import random
import sys
import threading
import time
from typing import Any

import pytest
import torch
from PIL import Image

from bbuqc_lightning.generation.decode_step import DecodeStep
from bbuqc_lightning.generation.engine import Ahead, GenerationEngine, PromptEncoder, SamplingParams
from bbuqc_lightning.models.factory import ModelBundle
from tests.test_engine import IMAGES, pool_engine, prompts_of_lengths, tokens, varied_bundle

SIZES = [(200, 120), (90, 160), (64, 64)]
PHOTOS = [Image.new("RGB", size, (37 * i % 255, 90, 200)) for i, size in enumerate(SIZES)]


@pytest.fixture(scope="module")
def varied(tiny_architecture: dict[str, Any]) -> ModelBundle:
    return varied_bundle(tiny_architecture)


def end_early(bundle: ModelBundle, *engines: GenerationEngine) -> None:
    """A random 1/16 of the vocabulary counts as an end: rows end at different steps, freeing slots mid-call."""
    vocab = bundle.model.config.text_config.vocab_size
    ends = random.Random(0).sample(range(vocab), vocab // 16)
    for engine in engines:
        engine.eos_token_ids = [*engine.eos_token_ids, *ends]


def overlapped(
    bundle: ModelBundle, hold: int = 0, threaded: bool | None = None, **kw: Any
) -> GenerationEngine:
    """A pool engine with overlapped prefill; ``hold``: decode steps each admission stays in flight at least,
    ``threaded``: the prefill in the worker thread on CPU too (both test knobs of the scheduler's overlap)."""
    engine = pool_engine(bundle, overlap_prefill=True, **kw)
    overlap = engine._pool_batcher().overlap
    assert overlap is not None
    overlap.hold_steps = hold
    if threaded is not None:
        overlap.threaded = threaded
    return engine


@pytest.mark.parametrize(("hold", "threaded"), [(0, None), (3, None), (2, True)])
def test_text_prompts_of_many_lengths_through_a_queue(
    varied: ModelBundle, hold: int, threaded: bool | None
) -> None:
    """Nine prompts through three slots, rows ending at different steps: the prompts after the first chunk are
    prefilled beside running rows and start one or more decode steps later."""
    convs = prompts_of_lengths([5, 60, 17, 120, 33, 8, 90, 45, 70])
    params = SamplingParams(max_new_tokens=16)
    hf = GenerationEngine(varied.model, varied.processor, backend="hf")
    engine = overlapped(varied, hold, threaded, prompt_slots=3, max_rows=3)
    end_early(varied, hf, engine)
    want, got = tokens(hf, convs, params), tokens(engine, convs, params)
    assert got == want
    assert len({len(ids) for ids in got}) > 3  # rows did end early
    stats = engine.stats
    # the first chunk alone was prefilled with no row running, every later one beside running rows
    assert stats["prompts"] == 9 and stats["overlapped_prefills"] >= 3
    assert stats["overlapped_steps"] >= stats["overlapped_prefills"]  # each stayed in flight a step at least
    if hold:
        assert stats["overlapped_steps"] > stats["overlapped_prefills"]  # some stayed in flight several steps
    if threaded:
        assert stats["overlap_worker_seconds"] > 0
    assert engine._pool_batcher()._admission is None  # nothing left in flight after the call


def test_photos_prefilled_beside_running_rows(varied: ModelBundle) -> None:
    """Photos of three sizes through two slots, held in flight for two steps: the vision tower's prompts (M-RoPE
    positions, DeepStack features) start late and still give HF's tokens."""
    convs = [IMAGES[i % 2] for i in range(6)]
    images = [[PHOTOS[i % 3]] for i in range(6)]
    params = SamplingParams(max_new_tokens=12)
    hf = GenerationEngine(varied.model, varied.processor, backend="hf")
    engine = overlapped(varied, hold=2, prompt_slots=2, max_rows=2)
    end_early(varied, hf, engine)
    assert tokens(engine, convs, params, images) == tokens(hf, convs, params, images)
    assert engine.stats["overlapped_prefills"] >= 1


def test_samples_of_a_prompt_start_together(varied: ModelBundle) -> None:
    """G = 3 samples of each of five prompts through two slots: the G rows of a prompt launched beside running
    rows start together (top-k 1 sampling: each sample is the greedy one)."""
    convs = prompts_of_lengths([30, 9, 70, 14, 50])
    shared = SamplingParams(max_new_tokens=12, do_sample=True, top_k=1, num_return_sequences=3)
    hf = GenerationEngine(varied.model, varied.processor, backend="hf")
    engine = overlapped(varied, hold=1, max_rows=6, prompt_slots=2)
    end_early(varied, hf, engine)
    greedy = tokens(hf, convs, SamplingParams(max_new_tokens=12))
    assert tokens(engine, convs, shared) == [ids for ids in greedy for _ in range(3)]
    assert engine.stats["overlapped_prefills"] >= 1


def test_prompts_handed_ahead(varied: ModelBundle) -> None:
    """Stage-A's lookahead: three calls, each handing the next one's prompts ahead; an admission in flight when a
    call's own prompts are done lands before it returns, and the next call goes on from there."""
    convs = prompts_of_lengths([40, 8, 66, 21, 90, 12])
    encoder = PromptEncoder(varied.processor)
    encoded = [encoder(conv) for conv in convs]
    params = SamplingParams(max_new_tokens=12)
    hf = GenerationEngine(varied.model, varied.processor, backend="hf")
    engine = overlapped(varied, hold=2, threaded=True, prompt_slots=2, max_rows=2)
    end_early(varied, hf, engine)
    want = tokens(hf, convs, params)
    got = []
    for call in range(3):
        mine, nxt = slice(2 * call, 2 * call + 2), slice(2 * call + 2, 2 * call + 4)
        ahead = Ahead(encoded[nxt], list(range(nxt.start, nxt.stop))) if call < 2 else None
        out = engine.generate(
            convs[mine], params, encoded=encoded[mine], keys=list(range(mine.start, mine.stop)), ahead=ahead
        )
        got += [c.token_ids for group in out for c in group]
        assert engine._pool_batcher()._admission is None
    assert got == want
    assert engine.stats["prompts"] == 6 and engine.stats["dropped_ahead"] == 0
    assert engine.stats["overlapped_prefills"] >= 1
    engine.close()


def test_a_failed_prefill_in_the_worker_ends_the_call(varied: ModelBundle) -> None:
    """The worker's error reaches the caller, nothing stays in flight, and the next call runs normally."""
    convs = prompts_of_lengths([5, 60, 17, 120, 33, 8, 90, 45, 70])
    params = SamplingParams(max_new_tokens=16)
    hf = GenerationEngine(varied.model, varied.processor, backend="hf")
    engine = overlapped(varied, threaded=True, prompt_slots=3, max_rows=3)
    end_early(varied, hf, engine)
    batcher = engine._pool_batcher()
    prefill, launch = batcher.prefill, batcher._launch

    def boom(chunk: list) -> Any:
        raise RuntimeError("prefill failed")

    def failing_launch(*args: Any, beside: bool) -> None:
        batcher.prefill = boom if beside else prefill  # the first prefill beside running rows fails
        launch(*args, beside=beside)

    batcher._launch = failing_launch  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="prefill failed"):
        tokens(engine, convs, params)
    assert batcher.stats.overlapped_prefills == 1 and batcher._admission is None
    batcher._launch, batcher.prefill = launch, prefill  # type: ignore[method-assign]
    assert tokens(engine, convs, params) == tokens(hf, convs, params)


@pytest.mark.parametrize("interrupt", [False, True])
def test_an_error_beside_a_prefill_in_flight_leaves_nothing_for_the_next_call(
    varied: ModelBundle, interrupt: bool
) -> None:
    """A decode step that fails while a (slow) prefill is in flight in the worker: the call ends with the worker done
    (no prefill runs on after it), nothing in flight, and the next call runs normally. ``interrupt``: a second
    Ctrl-C (KeyboardInterrupt) arrives while the failed call waits for the worker; the admission is dropped all the
    same, so the next call cannot land the old chunk into its own slots."""
    convs = prompts_of_lengths([5, 60, 17, 120, 33, 8, 90, 45, 70])
    params = SamplingParams(max_new_tokens=16)
    hf = GenerationEngine(varied.model, varied.processor, backend="hf")
    engine = overlapped(varied, hold=2, threaded=True, prompt_slots=3, max_rows=3)
    end_early(varied, hf, engine)
    batcher = engine._pool_batcher()
    overlap, step, prefill, flights = batcher.overlap, batcher.step, batcher.prefill, []
    assert overlap is not None

    def slow(chunk: list) -> Any:
        time.sleep(0.2)  # still running when the step fails (the assertions below hold either way)
        return prefill(chunk)

    def failing_run(bucket: Any) -> Any:
        if batcher._admission is not None:
            flights.append(batcher._admission.flight)
            raise RuntimeError("decode step failed")
        return DecodeStep.run(step, bucket)

    def interrupted(flight: Any) -> None:
        raise KeyboardInterrupt  # before the wait for the worker

    batcher.prefill, step.run = slow, failing_run  # type: ignore[method-assign]
    if interrupt:
        overlap.abandon = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt if interrupt else RuntimeError):
        tokens(engine, convs, params)
    assert len(flights) == 1 and flights[0].future is not None and batcher._admission is None
    if interrupt:
        flights[0].future.result()  # the worker's old prefill ends before the next call
        del overlap.abandon
    assert flights[0].future.done()
    batcher.prefill = prefill
    del step.run
    assert tokens(engine, convs, params) == tokens(hf, convs, params)


def test_a_prompt_whose_rows_end_at_their_first_token_frees_its_slot_at_once(varied: ModelBundle) -> None:
    """Five prompts through two slots; the third ends at its first token, admitted mid-call beside the fourth: its
    slot goes to the fifth on the next turn, not when the fourth's row ends (a whole generation of steps later)."""
    convs = prompts_of_lengths([30, 25, 20, 12, 10])  # longest first: 30 + 25, then 20 + 12, then 10
    params = SamplingParams(max_new_tokens=16)
    hf = GenerationEngine(varied.model, varied.processor, backend="hf")
    end = tokens(hf, convs, params)[2][0]  # the 20's first greedy token, made an end token
    hf.eos_token_ids = [*hf.eos_token_ids, end]
    want = tokens(hf, convs, params)
    assert [len(ids) for ids in want] == [16, 16, 1, 16, 16], want
    for overlap in (False, True):
        engine = pool_engine(varied, prompt_slots=2, max_rows=2, overlap_prefill=overlap)
        engine.eos_token_ids = hf.eos_token_ids
        assert tokens(engine, convs, params) == want, overlap
        # 15 steps for the first pair, then the 12 and the 10 side by side (a step or two apart): not 3 x 15
        assert engine.stats["decode_steps"] <= 2 * 16 + 2, (overlap, engine.stats)
        engine.close()


def test_the_worker_prefills_in_the_callers_modes(varied: ModelBundle) -> None:
    """The prefill in the worker thread runs in the caller's grad mode, inference mode and autocast (thread-local in
    PyTorch: a new thread starts with grad on), under Lightning's predict loop (inference mode) as outside it. A
    worker with grad on would record the prefill's graph into the pool (the model's weights require grad here)."""
    convs = prompts_of_lengths([5, 60, 17, 120, 33, 8])
    params = SamplingParams(max_new_tokens=8)
    engine = overlapped(varied, hold=1, threaded=True, prompt_slots=2, max_rows=2)
    batcher = engine._pool_batcher()
    prefill, caller, seen = batcher.prefill, threading.get_ident(), []

    def spy(chunk: list) -> Any:
        modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"))
        seen.append((threading.get_ident() != caller, *modes))
        return prefill(chunk)

    batcher.prefill = spy
    want = tokens(engine, convs, params)
    assert seen and set(seen) == {(True, False, False, False)}
    seen.clear()
    with torch.inference_mode():
        assert tokens(engine, convs, params) == want
    assert set(seen) == {(True, False, True, False)}
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens(engine, convs, params)
    assert set(seen) == {(True, False, False, True)}
    assert any(p.requires_grad for p in varied.model.parameters())
    assert engine.decode_step is not None
    assert not any(t.requires_grad for t in engine.decode_step.pool.tensors())
    engine.close()


def test_no_bucket_warms_up_beside_a_prefill(varied: ModelBundle) -> None:
    """A decode bucket's first run (a graph capture on GPU, which forbids other threads' CUDA calls) never runs
    while an admission is in flight, with warm-ups simulated on CPU: an admission is not launched in a turn whose
    step warms up a bucket (it would be landed before any step ran beside it: no overlap at all), it waits a turn;
    one in flight when the bucket changes (rows ended) is landed first, having overlapped a step or more. The
    tokens stay HF's."""
    hf = GenerationEngine(varied.model, varied.processor, backend="hf")
    firsts, landed_first, deferred = [], [], []
    scenarios = [
        (3, 3, [5, 60, 17, 120, 33, 8, 90, 45, 70], 16),
        (4, 6, [5, 200, 17, 120, 33, 8, 300, 45, 70, 9, 150, 11], 24),  # a bucket changes with one in flight
    ]
    for slots, hold, lengths, new_tokens in scenarios:
        engine = overlapped(varied, hold=hold, prompt_slots=slots, max_rows=slots)
        end_early(varied, engine)
        batcher, step = engine._pool_batcher(), engine.decode_step
        assert step is not None

        def warms_up(bucket: Any, batcher: Any = batcher, step: DecodeStep = step) -> bool:
            new = bucket not in step.graphs
            if new and batcher._admission is not None:  # the step lands it first
                landed_first.append(batcher._admission.flight.steps)
            elif new:  # asked before a launch: it waits a turn
                deferred.append(bucket)
            return new

        def watched_run(bucket: Any, batcher: Any = batcher, step: DecodeStep = step) -> Any:
            if bucket not in step.graphs:
                firsts.append(batcher._admission is None)
            return DecodeStep.run(step, bucket)

        step.warms_up, step.run = warms_up, watched_run  # type: ignore[method-assign]
        convs, params = prompts_of_lengths(lengths), SamplingParams(max_new_tokens=new_tokens)
        hf.eos_token_ids = engine.eos_token_ids
        assert tokens(engine, convs, params) == tokens(hf, convs, params), slots
    assert firsts and all(firsts)
    assert deferred and landed_first and all(steps > 0 for steps in landed_first), (deferred, landed_first)


def test_overlap_with_chunked_prefill_is_a_configuration_error(varied: ModelBundle) -> None:
    with pytest.raises(ValueError, match=r"overlap_prefill and generation\.prefill_chunk_tokens cannot be"):
        pool_engine(varied, overlap_prefill=True, prefill_chunk_tokens=16)
    for knob in ({"overlap_decode_priority": True}, {"overlap_switch_interval": 0.001}):
        with pytest.raises(
            ValueError, match=r"overlap_switch_interval .* need generation\.overlap_prefill=true"
        ):
            pool_engine(varied, **knob)
    with pytest.raises(ValueError, match=r"overlap_switch_interval must be > 0 seconds or null, got 0"):
        overlapped(varied, overlap_switch_interval=0)


def test_switch_interval_holds_for_the_call_and_is_restored(varied: ModelBundle) -> None:
    """``overlap_switch_interval``: the worker's prefills run under the configured interval (the whole call does),
    and the interpreter's own comes back when the call ends, also when it fails."""
    convs = prompts_of_lengths([5, 60, 17, 33, 8])
    params = SamplingParams(max_new_tokens=12)
    engine = overlapped(varied, 2, threaded=True, prompt_slots=2, max_rows=2, overlap_switch_interval=0.0007)
    plain = pool_engine(varied, prompt_slots=2, max_rows=2)
    end_early(varied, engine, plain)
    batcher = engine._pool_batcher()
    prefill, seen = batcher.prefill, []

    def recording(chunk: Any) -> Any:
        seen.append(sys.getswitchinterval())
        return prefill(chunk)

    batcher.prefill = recording
    before = sys.getswitchinterval()
    assert tokens(engine, convs, params) == tokens(plain, convs, params)
    assert len(seen) >= 2 and all(value == pytest.approx(0.0007) for value in seen), seen
    assert sys.getswitchinterval() == before

    def failing(chunk: Any) -> Any:
        raise RuntimeError("prefill failed")

    batcher.prefill = failing
    with pytest.raises(RuntimeError, match="prefill failed"):
        tokens(engine, convs, params)
    assert sys.getswitchinterval() == before
    engine.close()


def test_decode_priority_is_no_stream_on_cpu(varied: ModelBundle) -> None:
    """On CPU the option changes nothing (no streams): the same tokens, through the worker and held admissions."""
    convs = prompts_of_lengths([5, 60, 17, 33, 8])
    params = SamplingParams(max_new_tokens=12)
    engine = overlapped(varied, 2, threaded=True, prompt_slots=2, max_rows=2, overlap_decode_priority=True)
    plain = pool_engine(varied, prompt_slots=2, max_rows=2)
    end_early(varied, engine, plain)
    assert tokens(engine, convs, params) == tokens(plain, convs, params)
    overlap = engine._pool_batcher().overlap
    assert overlap is not None and overlap.decode_priority and overlap._priority is None
    engine.close()


@pytest.mark.gpu
def test_overlap_on_cuda_with_graphs(tiny_architecture: dict[str, Any]) -> None:
    """On the GPU: the prefill on the side stream from the worker thread, decode steps replaying CUDA graphs on
    the main stream, admissions held in flight for several replays, under inference mode (Lightning's predict
    loop) as well: the default path's tokens, text and photos."""
    varied = varied_bundle(tiny_architecture)
    varied.model.cuda()
    convs = prompts_of_lengths([5, 60, 17, 120, 33, 8, 90, 45, 70])
    params = SamplingParams(max_new_tokens=16)
    default = pool_engine(varied, prompt_slots=3, max_rows=3)
    end_early(varied, default)
    want = tokens(default, convs, params)
    for hold, priority, switch in ((0, False, None), (4, False, 5e-4), (0, True, None), (4, True, 5e-4)):
        engine = overlapped(
            varied,
            hold,
            prompt_slots=3,
            max_rows=3,
            overlap_decode_priority=priority,
            overlap_switch_interval=switch,
        )
        end_early(varied, engine)
        assert tokens(engine, convs, params) == want, (hold, priority, switch)
        with torch.inference_mode():
            assert tokens(engine, convs, params) == want, (hold, priority, switch)
        stats = engine.stats
        assert stats["overlapped_prefills"] >= 6 and stats["overlap_worker_seconds"] > 0
        assert engine.decode_step is not None and engine.decode_step.captures >= 1
        # the worker prefilled without grad (the weights require it): no autograd history in the pool
        assert not any(t.requires_grad for t in engine.decode_step.pool.tensors())
        overlap = engine._pool_batcher().overlap
        assert overlap is not None and (overlap._priority is not None) == priority  # the decode steps' stream
        if priority:  # above the default stream's 0 (lower numbers are higher priorities)
            assert overlap._priority is not None and overlap._priority.priority < 0
        engine.close()
    convs = [IMAGES[i % 2] for i in range(6)]
    images = [[PHOTOS[i % 3]] for i in range(6)]
    default = pool_engine(varied, prompt_slots=2, max_rows=2)
    engine = overlapped(varied, 2, prompt_slots=2, max_rows=2)
    end_early(varied, default, engine)
    assert tokens(engine, convs, params, images) == tokens(default, convs, params, images)
    assert engine.stats["overlapped_prefills"] >= 1
