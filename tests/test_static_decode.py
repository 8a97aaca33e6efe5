"""The static-cache decoder gives HF generate's greedy tokens: text and image prompts, left padding,
prefix sharing, suppressed tokens and min length."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from bbuqc_lightning.generation.engine import GenerationEngine, SamplingParams, line_break_token_ids
from bbuqc_lightning.models.factory import ModelBundle, load_model

TEXT = [
    [{"role": "user", "content": "你好，请判断"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "长一点的问题在这里吗？再长一点的问题"}],
]
IMAGES = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "描述"}]}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "描述这张图片的内容"}]}],
]


@pytest.fixture(scope="module")
def varied(tiny_architecture: dict[str, Any]) -> ModelBundle:
    arch = {
        "text": {**tiny_architecture["text"], "initializer_range": 0.3},
        "vision": tiny_architecture["vision"],
    }
    return load_model(kind="vl", random_init=True, architecture=arch, seed=0, max_pixels=65536)


def both(bundle: ModelBundle, convs: list, params: SamplingParams, images: list | None = None) -> tuple:
    hf = GenerationEngine(bundle.model, bundle.processor, backend="hf")
    static = GenerationEngine(bundle.model, bundle.processor, backend="static")
    return (
        [c.token_ids for group in hf.generate(convs, params, images) for c in group],
        [c.token_ids for group in static.generate(convs, params, images) for c in group],
    )


def test_greedy_text_with_left_padding(varied: ModelBundle) -> None:
    hf, static = both(varied, TEXT, SamplingParams(max_new_tokens=12))
    assert static == hf
    assert len(set(hf[0])) > 3  # a varied output, so equality means something


def test_greedy_images_of_different_sizes(varied: ModelBundle) -> None:
    images = [[Image.new("RGB", (200, 120), (200, 10, 10))], [Image.new("RGB", (90, 160), (10, 200, 10))]]
    hf, static = both(varied, IMAGES, SamplingParams(max_new_tokens=10), images)
    assert static == hf


def test_prefix_sharing_repeats_each_prompt(varied: ModelBundle) -> None:
    # top_k=1 sampling is deterministic, so every shared-prefix sample must equal the greedy answer.
    shared = SamplingParams(max_new_tokens=8, do_sample=True, top_k=1, num_return_sequences=3)
    greedy, _ = both(varied, TEXT, SamplingParams(max_new_tokens=8))
    _, samples = both(varied, TEXT, shared)
    assert samples == [greedy[0]] * 3 + [greedy[1]] * 3


def test_suppressed_tokens_and_min_length(varied: ModelBundle) -> None:
    breaks = line_break_token_ids(varied.tokenizer)
    params = SamplingParams(max_new_tokens=16, min_new_tokens=16, suppress_token_ids=breaks)
    hf, static = both(varied, TEXT, params)
    assert static == hf
    assert all(len(ids) == 16 and not set(ids) & set(breaks) for ids in static)
    decoded = [varied.tokenizer.decode(ids) for ids in static]
    assert all("\n" not in text for text in decoded)


def test_sampling_draws_from_the_generator(varied: ModelBundle) -> None:
    engine = GenerationEngine(varied.model, varied.processor, backend="static")
    params = SamplingParams(max_new_tokens=6, do_sample=True, temperature=1.0, num_return_sequences=4)
    torch.manual_seed(0)
    first = [c.token_ids for c in engine.generate(TEXT[:1], params)[0]]
    torch.manual_seed(0)
    again = [c.token_ids for c in engine.generate(TEXT[:1], params)[0]]
    assert first == again and len({tuple(ids) for ids in first}) > 1


def test_grouped_decode_attention_equals_repeated_kv_sdpa() -> None:
    """``bbuqc_sdpa`` on one query token with grouped KV heads: same output as sdpa over repeated heads."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv

    from bbuqc_lightning.models.attention import grouped_decode_sdpa

    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 3, 8, 2, 11, 16
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    query = torch.randn(batch, heads, 1, dim)
    key, value = torch.randn(2, batch, kv_heads, length, dim)
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    mask[0, ..., :4] = False  # left padding
    mask[2, ..., 9:] = False  # cache slots not written yet
    out, _ = grouped_decode_sdpa(module, query, key, value, mask, scaling=0.25)
    groups = heads // kv_heads
    want = F.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask, scale=0.25
    )
    assert out.shape == (batch, 1, heads, dim)
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[0], out[1])


def test_static_decoder_runs_grouped_decode_attention(tiny_architecture: dict[str, Any]) -> None:
    bundle = load_model(kind="vl", random_init=True, architecture=tiny_architecture, seed=0)
    assert bundle.model.config.text_config._attn_implementation == "sdpa"
    GenerationEngine(bundle.model, bundle.processor, backend="static").generate(
        TEXT, SamplingParams(max_new_tokens=2)
    )
    assert bundle.model.config.text_config._attn_implementation == "bbuqc_sdpa"
    assert bundle.model.config.vision_config._attn_implementation == "bbuqc_sdpa"  # delegates to sdpa
