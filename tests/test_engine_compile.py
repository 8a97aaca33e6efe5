"""``generation.compile_layers``: the decode step's layers compiled regionally give the eager tokens, and the
number of compiles stays bounded whatever prompt lengths and row counts the engine sees.

The default run shares one engine across the module and compiles with the ``aot_eager`` backend: Dynamo
traces the layer halves exactly as for inductor (the same guards, the same sharing across layers, the same
dynamic row dimension, the same compile counts) and runs the traced graph without generating code. CPU
inductor itself compiles the two halves in ~15 s cold (a loaded CI box: up to a minute), so the inductor
tests (tokens, LoRA layers, the Qwen3 text model) are ``slow``; the GPU test runs inductor on CUDA.

    python -m pytest -q tests/test_engine_compile.py               # default (aot_eager): ~10 s
    python -m pytest -q tests/test_engine_compile.py -m slow       # CPU inductor
    python -m pytest -q tests/test_engine_compile.py -m gpu        # inductor inside CUDA graphs
"""

from __future__ import annotations

from typing import Any

import pytest
import test_engine as engine_tests
import torch
from PIL import Image
from test_engine import IMAGES, TEXT, prompts_of_lengths, tokens, varied_bundle  # the engine tests' helpers

from bbuqc_lightning.generation.compiled_layers import compiled_graphs
from bbuqc_lightning.generation.engine import GenerationEngine, SamplingParams
from bbuqc_lightning.models.factory import ModelBundle

BACKEND = "aot_eager"  # the default run; the slow tests use "inductor"


def pool_engine(bundle: ModelBundle, **kwargs: Any) -> GenerationEngine:
    """The engine tests' pool engine with room for 16 rows (the compile-count test goes up to 16)."""
    return engine_tests.pool_engine(bundle, **{"max_rows": 16, "prompt_slots": 8, **kwargs})


@pytest.fixture(scope="module")
def varied(tiny_architecture: dict[str, Any]) -> ModelBundle:
    return varied_bundle(tiny_architecture)


@pytest.fixture(scope="module")
def compiled(varied: ModelBundle) -> GenerationEngine:
    """One compiled engine for the module (its first call pays the compile)."""
    return pool_engine(varied, compile_layers=True, compile_backend=BACKEND)


def test_default_is_eager(varied: ModelBundle) -> None:
    engine = pool_engine(varied)
    engine.generate(TEXT[:1], SamplingParams(max_new_tokens=2))
    assert engine.decode_step.regions is None and engine.decode_step.compiles == 0


def test_greedy_text_of_mixed_lengths_equals_hf(varied: ModelBundle, compiled: GenerationEngine) -> None:
    convs = prompts_of_lengths([5, 60, 17, 120, 33, 8, 90])
    hf = GenerationEngine(varied.model, varied.processor, backend="hf")
    params = SamplingParams(max_new_tokens=10)
    stop = tokens(hf, convs, params)[0][3]  # a token the first row emits: rows end at different steps
    for engine in (hf, compiled):
        engine.eos_token_ids = [*engine.eos_token_ids, stop]
    want = tokens(hf, convs, params)
    assert tokens(compiled, convs, params) == want
    assert len({len(ids) for ids in want}) > 1
    compiled.eos_token_ids = compiled.eos_token_ids[:-1]
    assert compiled.decode_step.compiles >= 1 and compiled.decode_step.compile_seconds > 0


def test_greedy_images_equal_hf(varied: ModelBundle, compiled: GenerationEngine) -> None:
    images = [[Image.new("RGB", (200, 120), (200, 10, 10))], [Image.new("RGB", (90, 160), (10, 200, 10))]]
    hf = GenerationEngine(varied.model, varied.processor, backend="hf")
    params = SamplingParams(max_new_tokens=10)
    assert tokens(compiled, IMAGES, params, images) == tokens(hf, IMAGES, params, images)


def test_samples_of_a_prompt_share_it(compiled: GenerationEngine, varied: ModelBundle) -> None:
    shared = SamplingParams(max_new_tokens=6, do_sample=True, top_k=1, num_return_sequences=3)
    greedy = tokens(pool_engine(varied), TEXT, SamplingParams(max_new_tokens=6))
    assert tokens(compiled, TEXT, shared) == [greedy[0]] * 3 + [greedy[1]] * 3


def test_compiles_do_not_grow_with_lengths_and_rows(compiled: GenerationEngine) -> None:
    """12 prompt lengths, 1 to 16 rows (1 or 2 samples a prompt, a queue): many buckets, two graphs at most."""
    lengths = [3, 11, 19, 27, 40, 57, 75, 99, 130, 170, 230, 300]
    workloads = [
        (lengths[:1], 1), (lengths[1:4], 1), (lengths[4:9], 2), (lengths[9:11], 2), (lengths[11:], 2),
        (lengths, 1), (lengths[::-1][:8], 2),
    ]  # fmt: skip
    before = compiled_graphs()
    for chunk, group in workloads:
        compiled.generate(
            prompts_of_lengths(chunk), SamplingParams(max_new_tokens=2, num_return_sequences=group)
        )
    step = compiled.decode_step
    assert step.captures >= 6  # buckets seen (slots 1 to 8 x 1 or 2 samples x two length buckets)
    assert step.compiles <= 2  # one graph per layer half, for every layer, row count and prompt length
    assert compiled_graphs() - before <= 2  # whether or not an earlier test compiled them already


@pytest.mark.slow
def test_inductor_greedy_equals_hf(varied: ModelBundle) -> None:
    """CPU inductor's fused code: text prompts of mixed lengths and image prompts, tokens equal HF's."""
    engine = pool_engine(varied, compile_layers=True, compile_backend="inductor")
    hf = GenerationEngine(varied.model, varied.processor, backend="hf")
    params = SamplingParams(max_new_tokens=10)
    convs = prompts_of_lengths([5, 60, 17, 120, 33])
    assert tokens(engine, convs, params) == tokens(hf, convs, params)
    images = [[Image.new("RGB", (200, 120), (200, 10, 10))], [Image.new("RGB", (90, 160), (10, 200, 10))]]
    assert tokens(engine, IMAGES, params, images) == tokens(hf, IMAGES, params, images)
    assert engine.decode_step.compiles <= 2


@pytest.mark.slow
def test_lora_layers_compile_once_more_and_follow_weight_updates(tiny_architecture: dict[str, Any]) -> None:
    """LoRA on the last 2 layers: one more graph per half; new adapter weights need no recompile."""
    from bbuqc_lightning.models.lora import apply_last_k_lora

    bundle = varied_bundle(tiny_architecture)
    model = apply_last_k_lora(bundle.model, k=2, r=4, alpha=8)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    with torch.no_grad():
        for p in lora_b:
            p.normal_(std=0.5)
    model.train()
    hf = GenerationEngine(model, bundle.processor, backend="hf")
    engine = GenerationEngine(
        model, bundle.processor, backend="pool", max_rows=8, prompt_slots=4, max_new_tokens=16,
        max_prompt_len=256, compile_layers=True, compile_backend="inductor",
    )  # fmt: skip
    convs = prompts_of_lengths([5, 60, 33])
    params = SamplingParams(max_new_tokens=8, do_sample=True, top_k=1, num_return_sequences=2)
    assert tokens(engine, convs, params) == tokens(hf, convs, params)
    compiles = engine.decode_step.compiles
    with torch.no_grad():
        for p in lora_b:
            p.add_(0.3)  # as after an optimiser step
    assert tokens(engine, convs, params) == tokens(hf, convs, params)
    assert engine.decode_step.compiles == compiles <= 4
    assert model.training  # the engine hands the model back in the mode it found it


@pytest.mark.slow
def test_text_model_greedy_equals_hf(tiny_text_bundle: ModelBundle) -> None:
    hf = GenerationEngine(tiny_text_bundle.model, tiny_text_bundle.processor, backend="hf")
    engine = pool_engine(tiny_text_bundle, compile_layers=True, compile_backend="inductor")
    params = SamplingParams(max_new_tokens=8)
    assert tokens(engine, TEXT, params) == tokens(hf, TEXT, params)


@pytest.mark.gpu
def test_compiled_layers_inside_cuda_graphs_give_the_eager_tokens(varied: ModelBundle) -> None:
    model = varied.model.cuda()
    try:
        convs = prompts_of_lengths([5, 60, 17, 120, 33])
        params = SamplingParams(max_new_tokens=12)
        eager = tokens(pool_engine(varied, cuda_graphs=False), convs, params)
        engine = pool_engine(varied, cuda_graphs=True, compile_layers=True)
        assert tokens(engine, convs, params) == eager
        assert engine.decode_step.captures >= 1 and engine.decode_step.compiles <= 2
    finally:
        model.cpu()
