"""The generation engine: the KV pool gives HF generate's greedy tokens (text and image prompts, mixed
lengths, rows ending early, more prompts than slots), its captures stay bounded whatever the shapes, and
its memory is allocated once."""

from __future__ import annotations

import pickle
from collections import deque
from typing import Any

import pytest
import torch
from PIL import Image

from bbuqc_lightning.generation.engine import (
    Ahead,
    GenerationEngine,
    PromptEncoder,
    SamplingParams,
    line_break_token_ids,
)
from bbuqc_lightning.generation.kv_pool import KVPool, PoolLayout
from bbuqc_lightning.generation.pool_attention import DecodeBatch, pool_attention
from bbuqc_lightning.generation.scheduler import PromptTooLongError, Request
from bbuqc_lightning.models.factory import ModelBundle, load_model

TEXT = [
    [{"role": "user", "content": "你好，请判断"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "长一点的问题在这里吗？再长一点的问题"}],
]
IMAGES = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "描述"}]}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "描述这张图片的内容"}]}],
]


def varied_bundle(tiny_architecture: dict[str, Any]) -> ModelBundle:
    """The tiny VL model with larger weights, so greedy outputs vary (equality then means something)."""
    arch = {
        "text": {**tiny_architecture["text"], "initializer_range": 0.3},
        "vision": tiny_architecture["vision"],
    }
    return load_model(kind="vl", random_init=True, architecture=arch, seed=0, max_pixels=65536)


@pytest.fixture(scope="module")
def varied(tiny_architecture: dict[str, Any]) -> ModelBundle:
    return varied_bundle(tiny_architecture)


def pool_engine(bundle: ModelBundle, **kwargs: Any) -> GenerationEngine:
    settings = {"max_rows": 8, "prompt_slots": 4, "max_new_tokens": 64, "max_prompt_len": 512, **kwargs}
    return GenerationEngine(bundle.model, bundle.processor, backend="pool", **settings)


def tokens(engine: GenerationEngine, convs: list, params: SamplingParams, images: list | None = None):
    return [c.token_ids for group in engine.generate(convs, params, images) for c in group]


def both(bundle: ModelBundle, convs: list, params: SamplingParams, images: list | None = None, **kw: Any):
    hf = GenerationEngine(bundle.model, bundle.processor, backend="hf")
    return tokens(hf, convs, params, images), tokens(pool_engine(bundle, **kw), convs, params, images)


def prompts_of_lengths(lengths: list[int]) -> list[list[dict]]:
    words = "光纤弯曲半径不合理螺丝未拧紧标签无法识别挡风板安装方向正确接地线捆扎整齐"
    return [[{"role": "user", "content": (words * 40)[:n]}] for n in lengths]


def test_prompts_handed_ahead_give_the_tokens_of_separate_calls_in_fewer_decode_steps(
    varied: ModelBundle,
) -> None:
    """Three calls, each handing the next one's prompts ahead (as Stage-A's predict batches do): the tokens of three
    separate calls, in fewer decode steps (the next call's prompts take the slots a call's last prompts leave, so
    prompts started in one call are finished in the next); a call that does not ask for the kept prompts drops
    them, and its own tokens are still right."""
    import random

    lengths = [[5, 60, 17, 120, 33, 8], [90, 12, 45, 70, 3, 25], [40, 100, 7, 55, 20, 66]]
    batches = [prompts_of_lengths(ls) for ls in lengths]
    encoder = PromptEncoder(varied.processor)
    encoded = [[encoder(conv) for conv in batch] for batch in batches]
    keys = [[(b, i) for i in range(len(batch))] for b, batch in enumerate(batches)]
    params = SamplingParams(max_new_tokens=24)
    vocab = varied.model.config.text_config.vocab_size
    ends = random.Random(0).sample(range(vocab), vocab // 16)  # summaries that end at different lengths

    def engine() -> GenerationEngine:
        e = pool_engine(varied, max_rows=4, prompt_slots=4)
        e.eos_token_ids = [*e.eos_token_ids, *ends]
        return e

    def run(e: GenerationEngine, b: int, **kw: Any) -> list[list[int]]:
        return [c.token_ids for g in e.generate(batches[b], params, encoded=encoded[b], **kw) for c in g]

    separate = engine()
    want = [run(separate, b) for b in range(3)]
    assert len({len(t) for batch in want for t in batch}) > 3  # rows end at different steps: a real tail
    handed = engine()
    got = []
    for b in range(3):
        ahead = Ahead(encoded[b + 1], keys[b + 1]) if b < 2 else None
        got.append(run(handed, b, keys=keys[b], ahead=ahead))
        if b == 0:
            assert handed.stats["prompts"] > 6  # some of the second call's prompts started in the first
    assert got == want
    assert handed.stats["decode_steps"] < separate.stats["decode_steps"]
    assert handed.stats["prompts"] == separate.stats["prompts"] == 18 and handed.stats["dropped_ahead"] == 0

    dropping = engine()
    run(dropping, 0, keys=keys[0], ahead=Ahead(encoded[1], keys[1]))
    assert run(dropping, 2, keys=keys[2]) == want[2]  # does not ask for the second call's prompts
    assert dropping.stats["dropped_ahead"] > 0
    run(dropping, 0, keys=keys[0], ahead=Ahead(encoded[1], keys[1]))
    assert run(dropping, 1) == want[1]  # a call without keys between two hand-overs (validation, eval)
    assert run(dropping, 2, keys=keys[2]) == want[2]
    with pytest.raises(ValueError, match="ahead needs keys"):
        dropping.generate(batches[0], params, encoded=encoded[0], ahead=Ahead(encoded[1], keys[1]))
    with pytest.raises(
        ValueError, match="repeat this call's keys"
    ):  # one key, two prompts: tokens could swap
        dropping.generate(
            batches[0], params, encoded=encoded[0], keys=keys[0], ahead=Ahead(encoded[1], keys[0])
        )


def test_auto_backend_is_the_pool(varied: ModelBundle) -> None:
    assert GenerationEngine(varied.model, varied.processor).backend == "pool"


def test_greedy_text_with_left_padding(varied: ModelBundle) -> None:
    hf, pool = both(varied, TEXT, SamplingParams(max_new_tokens=12))
    assert pool == hf
    assert len(set(hf[0])) > 3  # a varied output, so equality means something


def test_greedy_images_of_different_sizes(varied: ModelBundle) -> None:
    images = [[Image.new("RGB", (200, 120), (200, 10, 10))], [Image.new("RGB", (90, 160), (10, 200, 10))]]
    hf, pool = both(varied, IMAGES, SamplingParams(max_new_tokens=10), images)
    assert pool == hf


def test_prompts_encoded_ahead_give_the_same_tokens(varied: ModelBundle) -> None:
    """Prompts encoded outside the engine (pickled, as from DataLoader workers) give the tokens of
    conversations encoded inside it, on both backends; the pool's stats count the work and its encoding."""
    images = [[Image.new("RGB", (200, 120), (200, 10, 10))], [Image.new("RGB", (90, 160), (10, 200, 10))]]
    params = SamplingParams(max_new_tokens=10)
    encoder = pickle.loads(pickle.dumps(PromptEncoder(varied.processor)))
    encoded = [encoder(conv, imgs) for conv, imgs in zip(IMAGES, images, strict=True)]
    for backend in ("hf", "pool"):
        inside = (
            pool_engine(varied)
            if backend == "pool"
            else GenerationEngine(varied.model, varied.processor, backend="hf")
        )
        ahead = (
            pool_engine(varied)
            if backend == "pool"
            else GenerationEngine(varied.model, varied.processor, backend="hf")
        )
        want = tokens(inside, IMAGES, params, images)
        got = [c.token_ids for group in ahead.generate(IMAGES, params, encoded=encoded) for c in group]
        assert got == want, backend
        assert inside.stats["encode_seconds"] > 0 and ahead.stats["encode_seconds"] == 0
    stats = ahead.stats
    assert stats["prompts"] == 2 and stats["prompt_tokens"] == sum(e["input_ids"].shape[1] for e in encoded)
    assert stats["decode_steps"] >= 9 and 0 < stats["occupancy"] <= 1 and stats["decode_seconds"] > 0
    with pytest.raises(ValueError, match="1 encoded prompts for 2 conversations"):
        ahead.generate(IMAGES, params, encoded=encoded[:1])


def test_mixed_lengths_early_ends_and_a_queue(varied: ModelBundle) -> None:
    """Nine prompts of nine lengths through 3 slots; rows end early on a chosen end token."""
    convs = prompts_of_lengths([5, 60, 17, 120, 33, 8, 90, 45, 70])
    hf = GenerationEngine(varied.model, varied.processor, backend="hf")
    pool = pool_engine(varied, prompt_slots=3, max_rows=3)
    params = SamplingParams(max_new_tokens=10)
    free_run = tokens(hf, convs, params)
    stop = free_run[0][3]  # make a token the first row emits an end of sequence: rows end at different steps
    hf.eos_token_ids = pool.eos_token_ids = [*hf.eos_token_ids, stop]
    want, got = tokens(hf, convs, params), tokens(pool, convs, params)
    assert got == want
    assert len({len(ids) for ids in got}) > 1 and len(got[0]) == 4


def test_the_last_waiting_prompts_start_without_waiting_for_free_slots(varied: ModelBundle) -> None:
    """Eight prompts for eight slots, prefilled one at a time (a small prefill budget), every row 20 tokens:
    all are admitted within the first steps, so the call takes about 8 + 20 steps, not ~20 more for a last
    prompt left waiting for a quarter of the slots to free (what a fixed admission threshold did)."""
    convs = prompts_of_lengths([40, 41, 42, 43, 44, 45, 46, 47])
    params = SamplingParams(max_new_tokens=20, min_new_tokens=20)
    engine = pool_engine(varied, max_rows=8, prompt_slots=8, max_prefill_tokens=60)
    hf = GenerationEngine(varied.model, varied.processor, backend="hf")
    assert tokens(engine, convs, params) == tokens(hf, convs, params)
    stats = engine.stats
    assert stats["prefills"] == 8
    assert stats["decode_steps"] <= 8 + 20, stats


def test_a_prefill_chunk_stays_within_the_budget_across_handed_ahead_prompts(varied: ModelBundle) -> None:
    """The queue is sorted longest first per call (this call's prompts, then the next call's), not across: a chunk
    that reaches into the next call's longer prompts still pads to its widest one within ``max_prefill_tokens``."""
    engine = pool_engine(varied, max_rows=4, prompt_slots=4, max_prefill_tokens=280)
    batcher = engine._pool_batcher()
    waiting = deque(
        Request(i, {}, n, f"#{i}") for i, n in enumerate([10, 100, 90])
    )  # 10: this call's; then ahead
    chunk = batcher._take(waiting, [0, 1, 2])
    assert [r.length for r in chunk] == [10, 100] and [r.length for r in waiting] == [90]
    assert len(chunk) * max(r.length for r in chunk) <= 280


def test_pool_settings_under_the_hf_backend_are_reported(
    varied: ModelBundle, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="bbuqc_lightning.generation.engine"):
        GenerationEngine(varied.model, varied.processor, backend="hf")
        assert not caplog.records
        GenerationEngine(
            varied.model, varied.processor, backend="hf", overlap_prefill=True, compile_layers=True
        )
    assert "the pool engine's overlap_prefill, compile_layers do nothing here" in caplog.text


def test_samples_share_the_prompt(varied: ModelBundle) -> None:
    # top_k=1 sampling is deterministic, so every sample of a prompt must equal the greedy answer.
    shared = SamplingParams(max_new_tokens=8, do_sample=True, top_k=1, num_return_sequences=3)
    greedy, _ = both(varied, TEXT, SamplingParams(max_new_tokens=8))
    samples = tokens(pool_engine(varied, max_rows=6, prompt_slots=1), TEXT, shared)
    assert samples == [greedy[0]] * 3 + [greedy[1]] * 3


def test_suppressed_tokens_and_min_length(varied: ModelBundle) -> None:
    breaks = line_break_token_ids(varied.tokenizer)
    params = SamplingParams(max_new_tokens=16, min_new_tokens=16, suppress_token_ids=breaks)
    hf, pool = both(varied, TEXT, params)
    assert pool == hf
    assert all(len(ids) == 16 and not set(ids) & set(breaks) for ids in pool)


def test_sampling_draws_from_the_generator(varied: ModelBundle) -> None:
    engine = pool_engine(varied)
    params = SamplingParams(max_new_tokens=6, do_sample=True, temperature=1.0, num_return_sequences=4)
    torch.manual_seed(0)
    first = tokens(engine, TEXT[:1], params)
    torch.manual_seed(0)
    again = tokens(engine, TEXT[:1], params)
    assert first == again and len({tuple(ids) for ids in first}) > 1


def test_captures_and_memory_do_not_grow_with_shapes(varied: ModelBundle) -> None:
    """12 prompt lengths x 4 row counts x 2 group sizes: the bucket grid bounds the captures, the pool stays."""
    engine = pool_engine(varied, prompt_slots=8, max_rows=16, max_prompt_len=512)
    lengths = [3, 11, 19, 27, 40, 57, 75, 99, 130, 170, 230, 300]
    workloads = [
        (prompts_of_lengths(lengths[i : i + rows]), group)
        for group in (1, 2)
        for rows in (1, 3, 5, 8)
        for i in range(0, len(lengths), rows)
    ]

    def run_all() -> None:
        for convs, group in workloads:
            engine.generate(convs, SamplingParams(max_new_tokens=3, num_return_sequences=group))

    run_all()
    pool = engine.decode_step.pool
    pointers = [t.data_ptr() for t in pool.tensors()]
    captures = engine.decode_step.captures
    # slots buckets {1,2,4,8} x groups {1,2} x length buckets {256, 512} at most, whatever the 12 lengths
    assert captures <= 4 * 2 * 2
    run_all()
    assert engine.decode_step.captures == captures  # nothing new for shapes already seen
    assert [t.data_ptr() for t in pool.tensors()] == pointers
    assert pool.layout.nbytes == sum(t.numel() * t.element_size() for t in pool.tensors())


def test_a_prompt_longer_than_the_pool_names_it(varied: ModelBundle) -> None:
    engine = pool_engine(varied, max_prompt_len=16)
    with pytest.raises(PromptTooLongError, match=r"QC-TEMP-1::fail.*max_prompt_len=16"):
        engine.generate(prompts_of_lengths([80]), SamplingParams(max_new_tokens=2), names=["QC-TEMP-1::fail"])


def test_limits_are_configuration_errors(varied: ModelBundle) -> None:
    engine = pool_engine(varied, max_rows=4, max_new_tokens=8)
    with pytest.raises(ValueError, match="max_rows=4"):
        engine.generate(TEXT, SamplingParams(max_new_tokens=2, num_return_sequences=5))
    with pytest.raises(ValueError, match=r"generation.max_new_tokens=8"):
        engine.generate(TEXT, SamplingParams(max_new_tokens=9))
    with pytest.raises(ValueError, match="kv_memory_gb"):
        GenerationEngine(varied.model, varied.processor, kv_memory_gb=1e-6).generate(
            TEXT, SamplingParams(max_new_tokens=2)
        )


def test_generate_ids_pads_after_each_rows_end(varied: ModelBundle) -> None:
    engine = pool_engine(varied)
    hf = GenerationEngine(varied.model, varied.processor, backend="hf")
    encoded = engine.encode(TEXT)
    params = SamplingParams(max_new_tokens=7, do_sample=True, top_k=1, num_return_sequences=2)
    ours = engine.generate_ids(encoded, params)
    want = hf.generate_ids(encoded, params)
    assert ours.shape == (4, encoded.input_ids.shape[1] + 7)
    assert torch.equal(ours, want)


def test_pool_attention_equals_sdpa_over_the_concatenated_keys() -> None:
    """Cascade maths: prompt slot read once per group + own decode keys == sdpa over prompt ++ decode."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    slots, group, kv_heads, per_kv, dim = 3, 2, 2, 4, 16
    layout = PoolLayout(1, kv_heads, dim, slots, 32, slots * group, 8, 4)
    pool = KVPool(layout, torch.float32, "cpu")
    for t in pool.tensors():
        t.normal_()
    prompt_lens = torch.tensor([5, 32, 17])
    steps = torch.tensor([0, 3, 7, 2, 5, 1])
    rows = slots * group
    query = torch.randn(rows, kv_heads * per_kv, 1, dim)
    batch = DecodeBatch(
        pool, slots, group, 32, 8, steps,
        torch.where(torch.arange(32)[None] < prompt_lens[:, None], 0.0, float("-inf"))[:, None, None],
        torch.where(torch.arange(8)[None] <= steps[:, None], 0.0, float("-inf"))[:, None, None],
    )  # fmt: skip
    out = pool_attention(0, query, batch, scaling=0.25)
    for r in range(rows):
        s = r // group
        keys = torch.cat(
            [pool.prompt_keys[0, s, :, : prompt_lens[s]], pool.decode_keys[0, r, :, : steps[r] + 1]], 1
        )
        values = torch.cat(
            [pool.prompt_values[0, s, :, : prompt_lens[s]], pool.decode_values[0, r, :, : steps[r] + 1]], 1
        )
        want = F.scaled_dot_product_attention(
            query[r : r + 1], keys[None], values[None], scale=0.25, enable_gqa=True
        )
        torch.testing.assert_close(out[r, 0], want[0, :, 0], rtol=1e-5, atol=1e-5)


def test_engine_attention_leaves_config_files_alone(tiny_architecture: dict[str, Any], tmp_path) -> None:
    bundle = load_model(kind="vl", random_init=True, architecture=tiny_architecture, seed=0)
    GenerationEngine(bundle.model, bundle.processor).generate(TEXT, SamplingParams(max_new_tokens=2))
    assert bundle.model.config.text_config._attn_implementation == "bbuqc_engine"
    bundle.model.save_pretrained(tmp_path)
    assert '"bbuqc_engine"' not in (tmp_path / "config.json").read_text()


@pytest.mark.gpu
def test_cuda_graphs_give_the_eager_tokens(varied: ModelBundle) -> None:
    model = varied.model.cuda()
    try:
        convs = prompts_of_lengths([5, 60, 17, 120, 33])
        params = SamplingParams(max_new_tokens=12)
        eager = tokens(pool_engine(varied, cuda_graphs=False), convs, params)
        graphs = pool_engine(varied, cuda_graphs=True)
        assert tokens(graphs, convs, params) == eager
        assert graphs.decode_step.captures >= 1
    finally:
        model.cpu()


@pytest.mark.gpu
def test_fused_parts_equal_the_matrix_product_path_on_cuda() -> None:
    """The CUDA kernel path (two efficient-attention parts merged by log-sum-exp) == the matmul path."""
    import bbuqc_lightning.generation.pool_attention as pa

    torch.manual_seed(0)
    slots, group, kv_heads, per_kv, dim = 3, 4, 2, 4, 64
    layout = PoolLayout(1, kv_heads, dim, slots, 256, slots * group, 64, 2)
    pool = KVPool(layout, torch.bfloat16, "cuda")
    for t in pool.tensors():
        t.normal_()
    prompt_lens = torch.tensor([5, 256, 17], device="cuda")
    steps = torch.randint(0, 64, (slots * group,), device="cuda")
    query = torch.randn(slots * group, kv_heads * per_kv, 1, dim, device="cuda", dtype=torch.bfloat16)
    batch = DecodeBatch(
        pool, slots, group, 256, 64, steps,
        torch.where(torch.arange(256, device="cuda")[None] < prompt_lens[:, None], 0.0, -1e30)[:, None, None],
        torch.where(torch.arange(64, device="cuda")[None] <= steps[:, None], 0.0, -1e30)[:, None, None],
    )  # fmt: skip
    fused = pool_attention(0, query, batch, scaling=dim**-0.5)
    assert pa._FUSED, "the fused kernel path fell back"
    pa._FUSED = False
    try:
        plain = pool_attention(0, query, batch, scaling=dim**-0.5)
    finally:
        pa._FUSED = True
    torch.testing.assert_close(fused.float(), plain.float(), rtol=2e-2, atol=2e-2)


def test_the_fused_path_s_merge_of_the_two_parts_equals_one_softmax_over_both() -> None:
    """``merge_parts`` (the CUDA path's merge: sigmoid of the log-sum-exp difference, one lerp) gives the attention
    over prompt ++ decode keys, including a slot whose prompt keys are all masked (a free slot)."""
    from bbuqc_lightning.generation.pool_attention import _to_slots, merge_parts

    torch.manual_seed(0)
    slots, group, kv, per_kv, dim, lp, ld = 3, 2, 2, 4, 8, 11, 5
    rows = slots * group
    q = torch.randn(rows, kv, per_kv, dim)
    kp, vp = torch.randn(slots, kv, lp, dim), torch.randn(slots, kv, lp, dim)
    kd, vd = torch.randn(rows, kv, ld, dim), torch.randn(rows, kv, ld, dim)
    bias_p = torch.zeros(slots, 1, 1, lp)
    bias_p[0, ..., 4:] = -1e30
    bias_p[2] = -1e30  # a free slot: every prompt key masked
    bias_d = torch.zeros(rows, 1, 1, ld)
    bias_d[1, ..., 2:] = -1e30

    def part(
        query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        scores = query @ k.transpose(-1, -2) + bias
        return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)

    o1, l1 = part(_to_slots(q, slots, group), kp, vp, bias_p)
    o2, l2 = part(q, kd, vd, bias_d)
    merged = merge_parts(o1, l1, o2, l2, slots, group)
    for r in range(rows):
        s = r // group
        keys = torch.cat([kp[s], kd[r]], 1)
        values = torch.cat([vp[s], vd[r]], 1)
        bias = torch.cat([bias_p[s, 0, 0], bias_d[r, 0, 0]])
        want = torch.softmax(q[r] @ keys.transpose(-1, -2) + bias, -1) @ values
        torch.testing.assert_close(merged[r], want, rtol=1e-5, atol=1e-5)
