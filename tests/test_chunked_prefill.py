"""Chunked prefill (``generation.prefill_chunk_tokens``): prompts enter the KV pool a chunk at a time inside the
decode steps, and the greedy tokens stay HF ``generate``'s: text prompts of many lengths through fewer slots than
prompts, rows ending early, photos of different sizes whose image tokens (and DeepStack features) a chunk boundary
cuts, G samples of a prompt, and prompts handed ahead to the next call."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from bbuqc_lightning.generation.engine import Ahead, GenerationEngine, PromptEncoder, SamplingParams
from bbuqc_lightning.models.factory import ModelBundle
from tests.test_engine import IMAGES, TEXT, pool_engine, prompts_of_lengths, tokens, varied_bundle


@pytest.fixture(scope="module")
def varied(tiny_architecture: dict[str, Any]) -> ModelBundle:
    return varied_bundle(tiny_architecture)


def hf_tokens(bundle: ModelBundle, convs: list, params: SamplingParams, images: list | None = None) -> list:
    return tokens(GenerationEngine(bundle.model, bundle.processor, backend="hf"), convs, params, images)


def test_text_prompts_of_many_lengths_through_a_queue(varied: ModelBundle) -> None:
    convs = prompts_of_lengths([5, 60, 17, 120, 33, 8, 90, 45, 70])
    params = SamplingParams(max_new_tokens=10)
    hf = GenerationEngine(varied.model, varied.processor, backend="hf")
    chunked = pool_engine(varied, prompt_slots=3, max_rows=3, prefill_chunk_tokens=16)
    stop = tokens(hf, convs, params)[0][3]  # an end token the first row emits: rows end at different steps
    hf.eos_token_ids = chunked.eos_token_ids = [*hf.eos_token_ids, stop]
    want, got = tokens(hf, convs, params), tokens(chunked, convs, params)
    assert got == want
    assert len({len(ids) for ids in got}) > 1  # rows did end early
    stats = chunked.stats
    # every prompt token ran in a step of at most 16, most of them beside running rows
    assert stats["mixed_steps"] >= -(-stats["prompt_tokens"] // 16) and stats["prompts"] == 9
    assert stats["decode_steps"] > stats["mixed_steps"] > 0


def test_photos_cut_by_chunk_boundaries(varied: ModelBundle) -> None:
    """Chunks of 7 tokens cut through each photo's image tokens, so a chunk carries part of a photo's DeepStack
    features; two photos of different sizes, alone and together in the pool."""
    images = [[Image.new("RGB", (200, 120), (200, 10, 10))], [Image.new("RGB", (90, 160), (10, 200, 10))]]
    params = SamplingParams(max_new_tokens=10)
    want = hf_tokens(varied, IMAGES, params, images)
    for slots in (1, 2):
        engine = pool_engine(varied, prompt_slots=slots, max_rows=2, prefill_chunk_tokens=7)
        assert tokens(engine, IMAGES, params, images) == want, slots
    assert len(set(want[0])) > 3


def test_chunks_write_the_keys_and_values_of_a_whole_prefill(varied: ModelBundle) -> None:
    """The prompts' keys/values in the pool, every layer, equal those of transformers' whole-prompt prefill: a
    strict check of the positions and of the DeepStack features a chunk carries (greedy tokens alone would not
    see a small error). Two photos of different sizes, prepared together (left padded), in two slots."""
    images = [[Image.new("RGB", (200, 120), (200, 10, 10))], [Image.new("RGB", (90, 160), (10, 200, 10))]]
    encoder = PromptEncoder(varied.processor)
    lengths = [
        int(encoder(conv, imgs)["input_ids"].shape[1]) for conv, imgs in zip(IMAGES, images, strict=True)
    ]
    assert len(set(lengths)) == 2
    pools = []
    for chunk in (None, 7):
        engine = pool_engine(varied, prompt_slots=2, max_rows=2, prefill_chunk_tokens=chunk)
        tokens(engine, IMAGES, SamplingParams(max_new_tokens=1), images)
        pools.append(engine.decode_step.pool)
    for slot, length in enumerate(sorted(lengths, reverse=True)):  # the longest prompt takes the first slot
        for name in ("prompt_keys", "prompt_values"):
            whole, chunked = (getattr(p, name)[:, slot, :, :length] for p in pools)
            assert whole.abs().max() > 0 and (whole - chunked).abs().max() < 1e-4, (slot, name)


def test_text_prompts_beside_photo_prompts(varied: ModelBundle) -> None:
    """One call with photo prompts and text prompts (no pixels): whole prefills and chunks of both sizes."""
    photo = [Image.new("RGB", (200, 120), (200, 10, 10))]
    convs, images = [IMAGES[0], TEXT[1], IMAGES[1], TEXT[0]], [photo, [], photo, []]
    params = SamplingParams(max_new_tokens=6)
    want = [hf_tokens(varied, [conv], params, [imgs])[0] for conv, imgs in zip(convs, images, strict=True)]
    for chunk in (None, 7, 1000):
        engine = pool_engine(varied, prompt_slots=4, max_rows=4, prefill_chunk_tokens=chunk)
        assert tokens(engine, convs, params, images) == want, chunk


def test_samples_of_a_prompt_start_together(varied: ModelBundle) -> None:
    shared = SamplingParams(max_new_tokens=8, do_sample=True, top_k=1, num_return_sequences=3)
    greedy = hf_tokens(varied, TEXT, SamplingParams(max_new_tokens=8))
    engine = pool_engine(varied, max_rows=6, prompt_slots=2, prefill_chunk_tokens=5)
    assert tokens(engine, TEXT, shared) == [greedy[0]] * 3 + [greedy[1]] * 3


def test_prompts_handed_ahead(varied: ModelBundle) -> None:
    """Stage-A's lookahead with chunked prefill: three calls, each handing the next one's photos ahead."""
    sizes = [(200, 120), (90, 160), (64, 64), (120, 90), (160, 90), (80, 120)]
    photos = [[Image.new("RGB", size, (37 * i % 255, 90, 200))] for i, size in enumerate(sizes)]
    convs = [IMAGES[i % 2] for i in range(len(sizes))]
    encoder = PromptEncoder(varied.processor)
    encoded = [encoder(conv, imgs) for conv, imgs in zip(convs, photos, strict=True)]
    params = SamplingParams(max_new_tokens=8)
    want = hf_tokens(varied, convs, params, photos)
    engine = pool_engine(varied, prompt_slots=3, max_rows=3, prefill_chunk_tokens=32)
    got = []
    for call in range(3):
        mine = slice(2 * call, 2 * call + 2)
        nxt = slice(2 * call + 2, 2 * call + 4)
        ahead = Ahead(encoded[nxt], list(range(nxt.start, nxt.stop))) if call < 2 else None
        out = engine.generate(
            convs[mine], params, encoded=encoded[mine], keys=list(range(mine.start, mine.stop)), ahead=ahead
        )
        got += [c.token_ids for group in out for c in group]
    assert got == want
    assert engine.stats["prompts"] == 6 and engine.stats["dropped_ahead"] == 0


def test_a_chunk_size_below_one_is_a_configuration_error(varied: ModelBundle) -> None:
    with pytest.raises(ValueError, match="prefill_chunk_tokens must be >= 1"):
        pool_engine(varied, prefill_chunk_tokens=0)


@pytest.mark.gpu
def test_chunks_on_cuda_in_bf16_with_graphs(tiny_architecture: dict[str, Any]) -> None:
    """On the GPU: bf16 weights, decode-only steps in CUDA graphs beside eager chunk steps, the segments'
    memory-efficient attention kernel. Pool keys within bf16 rounding of a whole prefill's; the fp32 model's
    greedy tokens equal."""
    varied = varied_bundle(tiny_architecture)  # its own copy: the bf16 cast below rounds the weights
    model = varied.model.cuda()
    images = [[Image.new("RGB", (200, 120), (200, 10, 10))], [Image.new("RGB", (90, 160), (10, 200, 10))]]
    params = SamplingParams(max_new_tokens=10)
    want = tokens(pool_engine(varied), IMAGES, params, images)
    assert tokens(pool_engine(varied, prefill_chunk_tokens=7), IMAGES, params, images) == want
    model.to(torch.bfloat16)
    pools = []
    for chunk in (None, 7):
        engine = pool_engine(varied, prompt_slots=2, max_rows=2, prefill_chunk_tokens=chunk)
        tokens(engine, IMAGES, SamplingParams(max_new_tokens=1), images)
        pools.append(engine.decode_step.pool)
    whole, chunked = (p.prompt_keys[:, :2].float() for p in pools)
    assert (whole - chunked).abs().max() <= 0.05 * whole.abs().max()
