"""The ground floor: model factory, chat template, last-K LoRA and the generation engine (tiny models, CPU)."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import preset_architecture
from omegaconf import OmegaConf
from PIL import Image
from transformers import Qwen3ForCausalLM, Qwen3VLForConditionalGeneration

from bbuqc_lightning.config import config_dir
from bbuqc_lightning.constants import IM_END_ID, PAD_TOKEN_ID
from bbuqc_lightning.generation.engine import GenerationEngine, SamplingParams
from bbuqc_lightning.models.chat_template import render_for_test
from bbuqc_lightning.models.factory import (
    ModelBundle,
    ModelLoadError,
    load_model,
    vl_config_from_architecture,
)
from bbuqc_lightning.models.lora import (
    DEFAULT_TARGETS,
    apply_last_k_lora,
    first_adapted_layer,
    trainable_parameter_names,
)

IMAGE_PAD_ID = 151655
VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_CONV = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "描述这张照片"}]}]
# Prompts of clearly different token lengths, so a batch needs left padding.
TEXT_CONVS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "user", "content": "请详细描述这张图片中的BBU安装方式，螺丝是否齐全，并说明是否合格。"}],
    [{"role": "user", "content": "hi there"}],
]


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _varied(architecture: dict[str, Any]) -> dict[str, Any]:
    """A large initializer_range makes the random model's next token depend on the position and prompt
    (with 0.02 it tends to repeat one token, which would make equality tests vacuous)."""
    arch = {group: dict(values) for group, values in architecture.items()}
    arch["text"]["initializer_range"] = 0.5
    return arch


@pytest.fixture(scope="module")
def varied_bundle(tiny_architecture: dict[str, Any]) -> ModelBundle:
    return load_model(
        kind="vl", random_init=True, architecture=_varied(tiny_architecture), seed=0, max_pixels=65536
    )


@pytest.fixture(scope="module")
def varied_text_bundle(tiny_text_architecture: dict[str, Any]) -> ModelBundle:
    return load_model(kind="text", random_init=True, architecture=_varied(tiny_text_architecture), seed=0)


def _assert_varied(token_ids: list[int]) -> None:
    assert len(set(token_ids)) > 1, f"degenerate output {token_ids}: the equality test would prove nothing"


# --------------------------------------------------------------------------- forward and generate
def test_forward_with_image_gives_finite_logits(tiny_bundle: ModelBundle) -> None:
    engine = GenerationEngine(tiny_bundle.model, tiny_bundle.processor)
    encoded = engine.encode([IMAGE_CONV], images=[[noise_image(256, 192)]])
    assert {"pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(encoded.inputs)
    with torch.no_grad():
        logits = tiny_bundle.model(**encoded.inputs).logits
    assert logits.shape == (1, encoded.input_ids.shape[1], 151936)
    assert not torch.isnan(logits).any()
    assert torch.isfinite(logits).all()
    assert logits.std() > 0


def test_text_model_is_qwen3_causal_lm(
    tiny_text_bundle: ModelBundle, tiny_text_architecture: dict[str, Any]
) -> None:
    bundle = tiny_text_bundle
    assert isinstance(bundle.model, Qwen3ForCausalLM)
    assert bundle.kind == "text"
    assert bundle.processor is bundle.tokenizer
    assert bundle.model.config.num_hidden_layers == tiny_text_architecture["text"]["num_hidden_layers"]
    assert bundle.tokenizer.padding_side == "left"
    assert bundle.tokenizer.pad_token_id == PAD_TOKEN_ID
    ids = bundle.tokenizer(["通过"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(bundle.model(**ids).logits).all()


def test_vl_bundle_shapes(tiny_bundle: ModelBundle, tiny_architecture: dict[str, Any]) -> None:
    model = tiny_bundle.model
    assert isinstance(model, Qwen3VLForConditionalGeneration)
    assert len(model.model.language_model.layers) == tiny_architecture["text"]["num_hidden_layers"]
    assert len(model.model.visual.blocks) == tiny_architecture["vision"]["depth"]
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert model.generation_config.pad_token_id == PAD_TOKEN_ID
    size = tiny_bundle.processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (4096, 65536)


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text_only"])
def test_generate(tiny_bundle: ModelBundle, with_image: bool) -> None:
    engine = GenerationEngine(tiny_bundle.model, tiny_bundle.processor)
    conv = IMAGE_CONV if with_image else TEXT_CONVS[0]
    images = [[noise_image(256, 192)]] if with_image else None
    out = engine.generate([conv], SamplingParams(max_new_tokens=6), images=images)
    assert len(out) == 1 and len(out[0]) == 1
    completion = out[0][0]
    assert completion.prompt_index == 0
    assert 1 <= len(completion.token_ids) <= 6
    assert isinstance(completion.text, str)
    ended = completion.token_ids[-1] in engine.eos_token_ids
    assert completion.truncated is not ended
    assert all(token not in engine.eos_token_ids for token in completion.token_ids[:-1])


def test_generate_restores_training_mode(tiny_bundle: ModelBundle) -> None:
    engine = GenerationEngine(tiny_bundle.model, tiny_bundle.processor)
    tiny_bundle.model.train()
    try:
        engine.generate([TEXT_CONVS[0]], SamplingParams(max_new_tokens=2))
        assert tiny_bundle.model.training
    finally:
        tiny_bundle.model.eval()


# --------------------------------------------------------------------------- seeded construction
def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_same_seed_same_weights_other_seed_other_weights(
    tiny_bundle: ModelBundle, tiny_architecture: dict[str, Any]
) -> None:
    rng_before = torch.random.get_rng_state()
    again = load_model(kind="vl", random_init=True, architecture=tiny_architecture, seed=0).model
    other = load_model(kind="vl", random_init=True, architecture=tiny_architecture, seed=1).model
    # The caller's global RNG is untouched (fork_rng).
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    reference = _state(tiny_bundle.model)
    again_state, other_state = _state(again), _state(other)
    assert reference.keys() == again_state.keys() == other_state.keys()
    assert all(torch.equal(reference[k], again_state[k]) for k in reference)
    random_keys = [k for k in reference if reference[k].std() > 0]  # norms are all ones whatever the seed
    assert random_keys
    assert all(not torch.equal(reference[k], other_state[k]) for k in random_keys)


def test_a_bf16_random_model_is_built_in_bf16_and_is_a_function_of_its_seed(
    tiny_architecture: dict[str, Any],
) -> None:
    def build(seed: int) -> torch.nn.Module:
        arch = tiny_architecture
        return load_model(kind="vl", random_init=True, architecture=arch, seed=seed, dtype="bfloat16").model

    one, again, other = _state(build(0)), _state(build(0)), _state(build(1))
    assert {v.dtype for v in one.values() if v.is_floating_point()} == {torch.bfloat16}
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert any(not torch.equal(one[k], other[k]) for k in one)


def test_random_weights_are_drawn_on_the_run_s_gpu_only_for_one_gpu_runs(
    tiny_bundle: ModelBundle, tiny_architecture: dict[str, Any]
) -> None:
    """``train`` draws a random-init model on its one GPU (a 4B model: seconds, not a minute on the host);
    CPU and multi-device runs draw on the CPU, where ``init_device="cpu"`` is the default's weights."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from bbuqc_lightning.train import _random_init_device

    def trainer(devices: int, device: str) -> SimpleNamespace:
        return SimpleNamespace(
            num_devices=devices, strategy=SimpleNamespace(root_device=torch.device(device))
        )

    random_cfg = OmegaConf.create({"model": {"random_init": True}})
    assert _random_init_device(random_cfg, trainer(1, "cuda:0")) == {"init_device": "cuda:0"}
    assert _random_init_device(random_cfg, trainer(2, "cuda:0")) == {}
    assert _random_init_device(random_cfg, trainer(1, "cpu")) == {}
    assert (
        _random_init_device(OmegaConf.create({"model": {"random_init": False}}), trainer(1, "cuda:0")) == {}
    )
    on_cpu = load_model(
        kind="vl", random_init=True, architecture=tiny_architecture, seed=0, init_device="cpu"
    )
    reference = _state(tiny_bundle.model)
    assert all(torch.equal(reference[k], v) for k, v in _state(on_cpu.model).items())


def test_patch_embedding_runs_as_a_matrix_product_with_the_conv_s_output_and_weights(
    tiny_bundle: ModelBundle, tiny_architecture: dict[str, Any]
) -> None:
    """``load_model`` runs the vision tower's Conv3d patch embedding as ``F.linear`` (slow cuDNN paths, see
    models/patch_embed.py): the same output as the Conv3d, the same state dict, and the model still pickles."""
    import pickle

    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchEmbed

    from bbuqc_lightning.models.patch_embed import LinearPatchEmbed

    embed = tiny_bundle.model.model.visual.patch_embed
    assert type(embed) is LinearPatchEmbed
    pixels = torch.randn(24, embed.proj.weight[0].numel())
    linear = embed(pixels)
    embed.__class__ = Qwen3VLVisionPatchEmbed
    try:
        conv = embed(pixels)
    finally:
        embed.__class__ = LinearPatchEmbed
    assert linear.shape == conv.shape == (24, embed.embed_dim)
    torch.testing.assert_close(linear, conv, rtol=1e-5, atol=1e-5)
    plain = load_model(
        kind="vl", random_init=True, architecture=tiny_architecture, seed=0, linear_patch_embed=False
    )
    assert type(plain.model.model.visual.patch_embed) is Qwen3VLVisionPatchEmbed
    assert list(plain.model.state_dict()) == list(tiny_bundle.model.state_dict())
    assert type(pickle.loads(pickle.dumps(embed))) is LinearPatchEmbed


def test_cudnn_attention_false_takes_cudnn_out_of_sdpa_and_true_leaves_torch_alone(
    tiny_architecture: dict[str, Any],
) -> None:
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        load_model(kind="text", random_init=True, architecture=tiny_architecture, seed=0)
        assert torch.backends.cuda.cudnn_sdp_enabled()
        load_model(
            kind="text", random_init=True, architecture=tiny_architecture, seed=0, cudnn_attention=False
        )
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


# --------------------------------------------------------------------------- chat template and image tokens
def test_chat_template_renders_vision_block(tiny_bundle: ModelBundle) -> None:
    expected = f"<|im_start|>user\n{VISION_BLOCK}描述这张照片<|im_end|>\n<|im_start|>assistant\n"
    assert render_for_test(IMAGE_CONV) == expected
    rendered = tiny_bundle.processor.apply_chat_template(
        IMAGE_CONV, tokenize=False, add_generation_prompt=True
    )
    assert rendered == expected  # chatml: no default system prompt, no think block
    engine = GenerationEngine(tiny_bundle.model, tiny_bundle.processor)
    assert engine.render(IMAGE_CONV) == expected


def _pixel_bounds(bundle: ModelBundle) -> tuple[int, int]:
    size = bundle.processor.image_processor.size
    return size["shortest_edge"], size["longest_edge"]


def _smart_resize_tokens(width: int, height: int, min_pixels: int, max_pixels: int, factor: int = 32) -> int:
    """Independent re-statement of Qwen's smart_resize: sides to multiples of 32 within the pixel bounds."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return (h // factor) * (w // factor)


@pytest.mark.parametrize(
    ("width", "height", "tokens"),
    [
        (256, 192, 48),  # fits: (256/32) * (192/32)
        (512, 384, 54),  # 196608 px > 65536: scaled by sqrt(3) -> 288 x 192 -> 9 * 6
        (40, 40, 4),  # 1600 px < min_pixels 4096: scaled up to 64 x 64 -> 2 * 2
    ],
)
def test_image_pad_expands_to_hw_over_1024(
    tiny_bundle: ModelBundle, width: int, height: int, tokens: int
) -> None:
    min_pixels, max_pixels = _pixel_bounds(tiny_bundle)
    assert _smart_resize_tokens(width, height, min_pixels, max_pixels) == tokens
    enc = tiny_bundle.processor(
        text=[f"看{VISION_BLOCK}"], images=[noise_image(width, height)], return_tensors="pt"
    )
    grid = enc["image_grid_thw"][0]
    assert int(grid.prod()) // 4 == tokens  # 16-pixel patches merged 2x2
    assert int((enc["input_ids"] == IMAGE_PAD_ID).sum()) == tokens
    assert min_pixels <= int(grid[1]) * int(grid[2]) * 16 * 16 <= max_pixels


def test_assistant_mask_covers_assistant_content_and_im_end(tiny_bundle: ModelBundle) -> None:
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": noise_image(256, 192)}, {"type": "text", "text": "描述"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "通过\n理由: 图片_1螺丝齐全。"}]},
        {"role": "user", "content": "再判断一次"},
        {"role": "assistant", "content": "不通过"},
    ]
    out = tiny_bundle.processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    ids, mask = out["input_ids"][0], out["assistant_masks"][0].bool()
    assert int((ids == IMAGE_PAD_ID).sum()) == 48  # the image is expanded and the mask stays aligned
    decode = tiny_bundle.tokenizer.decode
    assert decode(ids[mask]) == "通过\n理由: 图片_1螺丝齐全。<|im_end|>不通过<|im_end|>"
    # Two runs, each ending on <|im_end|>; the "\n" after it and the "<|im_start|>assistant\n" before are not trained.
    starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    ends = [i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    assert len(starts) == len(ends) == 2
    for start, end in zip(starts, ends, strict=True):
        assert int(ids[end]) == IM_END_ID
        assert decode(ids[start - 3 : start]) == "<|im_start|>assistant\n"
        assert decode(ids[end + 1 : end + 2]) == "\n"


# --------------------------------------------------------------------------- architecture checks and presets
def test_check_vl_shapes_reports_every_problem_at_once(tiny_architecture: dict[str, Any]) -> None:
    broken = {group: dict(values) for group, values in tiny_architecture.items()}
    broken["vision"].update(
        out_hidden_size=48, num_heads=3, num_position_embeddings=60, deepstack_visual_indexes=[5]
    )
    broken["text"].update(mrope_section=[4, 4, 4], vocab_size=1000)
    with pytest.raises(ValueError, match=r"Invalid model\.architecture") as info:
        vl_config_from_architecture(broken)
    message = str(info.value)
    for fragment in (
        "out_hidden_size must equal text.hidden_size",
        "sum(text.mrope_section)=12 must equal head_dim/2=8",
        "divisible by vision.num_heads",
        "perfect square",
        "deepstack_visual_indexes",
        "vocab_size",
    ):
        assert fragment in message
    assert message.count(";") == 5


def test_valid_tiny_architecture_passes_the_shape_check(tiny_architecture: dict[str, Any]) -> None:
    config = vl_config_from_architecture(tiny_architecture)
    assert config.text_config.hidden_size == config.vision_config.out_hidden_size == 64


def test_small_preset_builds_and_reads_a_synthetic_size_photo() -> None:
    """``model=small`` (the learning proof's from-scratch model): the sizes its file states, a finite forward
    on a 320x240 photo (80 image tokens: rounded up to 320x256, not scaled down)."""
    preset = OmegaConf.load(config_dir() / "model" / "small.yaml")
    bundle = load_model(
        kind="vl", random_init=True, architecture=preset_architecture("small"), max_pixels=preset.max_pixels
    )
    total = sum(p.numel() for p in bundle.model.parameters())
    vision = sum(p.numel() for p in bundle.model.model.visual.parameters())
    assert 100e6 < total < 110e6 and vision < 2e6
    engine = GenerationEngine(bundle.model, bundle.processor)
    encoded = engine.encode([IMAGE_CONV], images=[[noise_image(320, 240)]])
    assert int((encoded.input_ids == IMAGE_PAD_ID).sum()) == 80
    with torch.no_grad():
        logits = bundle.model(**encoded.inputs).logits
    assert torch.isfinite(logits).all() and logits.std() > 0


# MODEL_NOTES.md table: text hidden / inter / layers / heads / kv / head_dim, tied, vision depth / hidden /
# out_hidden, deepstack indexes.
REAL_PRESETS = {
    "qwen3_vl_2b": (2048, 6144, 28, 16, 8, 128, True, 24, 1024, 2048, [5, 11, 17]),
    "qwen3_vl_4b": (2560, 9728, 36, 32, 8, 128, True, 24, 1024, 2560, [5, 11, 17]),
    "qwen3_vl_8b": (4096, 12288, 36, 32, 8, 128, False, 27, 1152, 4096, [8, 16, 24]),
}


@pytest.mark.parametrize("preset", sorted(REAL_PRESETS))
def test_real_preset_architecture_builds_config_only(preset: str) -> None:
    """random_init on a real preset builds this exact config (weights are never instantiated here)."""
    hidden, inter, layers, heads, kv, head_dim, tied, depth, v_hidden, out_hidden, deepstack = REAL_PRESETS[
        preset
    ]
    config = vl_config_from_architecture(preset_architecture(preset))
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (hidden, inter, layers)
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (heads, kv, head_dim)
    assert (text.vocab_size, text.max_position_embeddings) == (151936, 262144)
    assert text.rope_parameters["mrope_section"] == [24, 20, 20]
    assert text.rope_parameters["rope_theta"] == 5_000_000.0
    assert config.tie_word_embeddings is tied
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size) == (depth, v_hidden, out_hidden)
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (16, 2, 2)
    assert vision.num_position_embeddings == 2304
    assert vision.deepstack_visual_indexes == deepstack
    assert (config.image_token_id, config.vision_start_token_id, config.vision_end_token_id) == (
        151655,
        151652,
        151653,
    )


# --------------------------------------------------------------------------- loading real checkpoints
@pytest.mark.parametrize("kind", ["vl", "text"])
def test_missing_checkpoint_raises_model_load_error(kind: str) -> None:
    path = "/nonexistent/Qwen3-VL-4B"
    with pytest.raises(ModelLoadError) as info:
        load_model(kind=kind, model_name_or_path=path)
    message = str(info.value)
    assert path in message
    assert "model.model_name_or_path=/" in message  # shows how to point at a local folder
    assert "folder" in message
    assert "offline=1" in message


def test_empty_local_folder_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(kind="vl", model_name_or_path=str(tmp_path))
    assert f"the local folder {tmp_path.resolve()}" in str(info.value)


@pytest.mark.filterwarnings("ignore:Passing `min_pixels`:FutureWarning")
def test_local_checkpoint_folder_round_trip(tiny_bundle: ModelBundle, tmp_path: Path) -> None:
    """A saved checkpoint loads through model_name_or_path with the same weights, the project template
    and the configured pixel bounds (16384 px: a 256x192 image becomes 128x96 -> 12 tokens)."""
    tiny_bundle.model.save_pretrained(tmp_path)
    tiny_bundle.processor.save_pretrained(tmp_path)
    loaded = load_model(kind="vl", model_name_or_path=str(tmp_path), min_pixels=4096, max_pixels=16384)
    assert isinstance(loaded.model, Qwen3VLForConditionalGeneration)
    assert all(m.training for m in loaded.model.modules())  # train mode, as a random-init model
    reference = tiny_bundle.model.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in loaded.model.state_dict().items())
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.model.generation_config.pad_token_id == PAD_TOKEN_ID
    assert loaded.processor.apply_chat_template(IMAGE_CONV, tokenize=False, add_generation_prompt=True) == (
        render_for_test(IMAGE_CONV)
    )
    with warnings.catch_warnings(record=True) as caught:  # bounds set through `size`: no per-call warning
        warnings.simplefilter("always")
        enc = loaded.processor(text=[VISION_BLOCK], images=[noise_image(256, 192)], return_tensors="pt")
    assert not [w for w in caught if "min_pixels" in str(w.message)], [str(w.message) for w in caught]
    assert _smart_resize_tokens(256, 192, 4096, 16384) == 12
    assert int((enc["input_ids"] == IMAGE_PAD_ID).sum()) == 12


def test_no_path_and_no_random_init_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"model\.model_name_or_path"):
        load_model(kind="vl")
    with pytest.raises(ValueError, match=r"model\.architecture"):
        load_model(kind="vl", random_init=True)
    with pytest.raises(ValueError, match=r"model\.dtype"):
        load_model(kind="vl", random_init=True, architecture={}, dtype="fp8")


# --------------------------------------------------------------------------- last-K LoRA
def test_last_k_lora_trains_only_the_last_k_llm_blocks(tiny_architecture: dict[str, Any]) -> None:
    model = load_model(kind="vl", random_init=True, architecture=tiny_architecture, seed=0).model
    n_layers = tiny_architecture["text"]["num_hidden_layers"]
    peft_model = apply_last_k_lora(model, k=2, r=8, alpha=16)
    names = trainable_parameter_names(peft_model)
    pattern = re.compile(
        r"\.model\.language_model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.default\.weight$"
    )
    found = set()
    for name in names:
        match = pattern.search(name)
        assert match, f"unexpected trainable parameter {name}"
        found.add((int(match[1]), match[2], match[3]))
    expected = {
        (layer, proj, ab) for layer in (n_layers - 2, n_layers - 1) for proj in DEFAULT_TARGETS for ab in "AB"
    }
    assert found == expected
    assert len(names) == len(expected) == 2 * 7 * 2
    assert not any("visual" in n for n in names)
    # Vision tower, aligner and the earlier LLM blocks carry no adapters at all.
    lora_modules = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert len(lora_modules) == 14
    assert all(f"layers.{n_layers - 2}." in n or f"layers.{n_layers - 1}." in n for n in lora_modules)
    # lora_B starts at zero: the adapted model equals the reference (adapters disabled) before training.
    ids = torch.tensor([[151644, 872, 198, 53481, 151645]])
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            reference = peft_model(input_ids=ids).logits
    assert torch.equal(adapted, reference)


def test_lora_is_built_from_config_and_the_frozen_count_read_off_the_model(
    tiny_architecture: dict[str, Any],
) -> None:
    """conf/lora/last_k.yaml is the one LoRA default: GRPO and fusion SFT compose it as a partial (like the
    optimizer), and the layers below the first adapted one are what the GRPO forward runs without gradients."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(config_dir()), version_base=None):
        grpo = compose("train", ["+experiment=grpo", "module.lora.k=3"]).module.lora
        sft = compose("train", ["+experiment=fusion_sft"]).module.lora
    assert OmegaConf.to_container(sft) == {**OmegaConf.to_container(grpo), "k": 4}
    base = load_model(kind="vl", random_init=True, architecture=tiny_architecture, seed=0).model
    with pytest.raises(ValueError, match="no decoder layer"):
        first_adapted_layer(base)
    model = instantiate(grpo)(base)
    n_layers = tiny_architecture["text"]["num_hidden_layers"]
    assert first_adapted_layer(model) == n_layers - 3
    assert {int(n.split("layers.")[1].split(".")[0]) for n in trainable_parameter_names(model)} == set(
        range(n_layers - 3, n_layers)
    )


@pytest.mark.parametrize("k", [0, 7])
def test_last_k_lora_rejects_k_outside_the_model(tiny_text_bundle: ModelBundle, k: int) -> None:
    with pytest.raises(ValueError, match=r"lora k must be in \[1, 4\]"):
        apply_last_k_lora(tiny_text_bundle.model, k=k, r=8, alpha=16)


# --------------------------------------------------------------------------- generation engine
@pytest.mark.parametrize("which", ["vl", "text"])
def test_batched_greedy_equals_batch_of_one(which: str, request: pytest.FixtureRequest) -> None:
    bundle = request.getfixturevalue("varied_bundle" if which == "vl" else "varied_text_bundle")
    engine = GenerationEngine(bundle.model, bundle.processor)
    encoded = engine.encode(TEXT_CONVS)
    assert (encoded.inputs["attention_mask"] == 0).any(), "prompts must differ in length to test left padding"
    assert (encoded.inputs["attention_mask"][:, -1] == 1).all(), "padding must be on the left"
    params = SamplingParams(max_new_tokens=8, min_new_tokens=8)
    batched = engine.generate(TEXT_CONVS, params)
    for index, conv in enumerate(TEXT_CONVS):
        single = engine.generate([conv], params)[0][0]
        _assert_varied(single.token_ids)
        assert batched[index][0].token_ids == single.token_ids
        assert batched[index][0].prompt_index == index


def test_batched_greedy_with_images_of_different_sizes(varied_bundle: ModelBundle) -> None:
    """Stage-A's path: different image sizes -> different prompt lengths and M-RoPE offsets per row."""
    engine = GenerationEngine(varied_bundle.model, varied_bundle.processor)
    images = [noise_image(256, 192, seed=1), noise_image(128, 128, seed=2)]
    params = SamplingParams(max_new_tokens=6, min_new_tokens=6)
    batched = engine.generate([IMAGE_CONV, IMAGE_CONV], params, images=[[im] for im in images])
    for index, image in enumerate(images):
        single = engine.generate([IMAGE_CONV], params, images=[[image]])[0][0]
        _assert_varied(single.token_ids)
        assert batched[index][0].token_ids == single.token_ids


@pytest.mark.parametrize("which", ["vl", "text"])
def test_prefix_sharing_matches_plain_generate(which: str, request: pytest.FixtureRequest) -> None:
    bundle = request.getfixturevalue("varied_bundle" if which == "vl" else "varied_text_bundle")
    params = SamplingParams(
        max_new_tokens=8, min_new_tokens=8, do_sample=True, top_k=1, num_return_sequences=3
    )
    shared = GenerationEngine(bundle.model, bundle.processor, prefix_sharing=True).generate(
        TEXT_CONVS, params
    )
    plain = GenerationEngine(bundle.model, bundle.processor, prefix_sharing=False).generate(
        TEXT_CONVS, params
    )
    assert len(shared) == len(plain) == len(TEXT_CONVS)
    for index in range(len(TEXT_CONVS)):
        assert len(shared[index]) == len(plain[index]) == 3
        _assert_varied(plain[index][0].token_ids)
        assert [c.token_ids for c in shared[index]] == [c.token_ids for c in plain[index]], f"prompt {index}"


def test_prefix_sharing_matches_plain_generate_without_padding(varied_text_bundle: ModelBundle) -> None:
    """Equal-length prompts (no padding) already agree; the padded case above is the known bug."""
    bundle = varied_text_bundle
    convs = [[{"role": "user", "content": "甲乙"}], [{"role": "user", "content": "丙丁"}]]
    params = SamplingParams(
        max_new_tokens=8, min_new_tokens=8, do_sample=True, top_k=1, num_return_sequences=3
    )
    shared_engine = GenerationEngine(bundle.model, bundle.processor, prefix_sharing=True)
    assert not (shared_engine.encode(convs).inputs["attention_mask"] == 0).any()
    shared = shared_engine.generate(convs, params)
    plain = GenerationEngine(bundle.model, bundle.processor, prefix_sharing=False).generate(convs, params)
    for index in range(len(convs)):
        _assert_varied(plain[index][0].token_ids)
        assert [c.token_ids for c in shared[index]] == [c.token_ids for c in plain[index]]


def test_prefix_sharing_ignores_rope_deltas_of_an_earlier_image_call(varied_bundle: ModelBundle) -> None:
    """An image call leaves non-zero M-RoPE offsets of batch 1 in the model; a later prefix-shared text
    batch must neither crash on their shape nor reuse their values."""
    engine = GenerationEngine(varied_bundle.model, varied_bundle.processor, prefix_sharing=True)
    plain = GenerationEngine(varied_bundle.model, varied_bundle.processor, prefix_sharing=False)
    convs = [[{"role": "user", "content": "甲乙"}], [{"role": "user", "content": "丙丁"}]]
    params = SamplingParams(
        max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=1, num_return_sequences=3
    )
    expected = plain.generate(convs, params)
    engine.generate([IMAGE_CONV], SamplingParams(max_new_tokens=2), images=[[noise_image(256, 192)]])
    stale = varied_bundle.model.model.rope_deltas
    assert stale is not None and stale.shape[0] == 1 and bool((stale != 0).any())
    out = engine.generate(convs, params)
    assert [[c.token_ids for c in group] for group in out] == [
        [c.token_ids for c in group] for group in expected
    ]


def test_rms_norms_are_swapped_for_the_fused_kernel_same_weights_and_hf_numbers(
    tiny_bundle: ModelBundle, tiny_text_bundle: ModelBundle, tiny_architecture: dict[str, Any]
) -> None:
    """``load_model`` swaps every text RMSNorm (4 a layer and the final one) for a subclass that runs
    ``F.rms_norm`` on the GPU: its formula gives HF's result (fp32 exactly up to rounding, bf16 within one rounding
    step, fp32 weights over bf16 activations in fp32), the CPU runs HF's code itself, the state dict is unchanged
    and the model still pickles; ``fused_rms_norm=False`` keeps HF's class."""
    import pickle

    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRMSNorm

    from bbuqc_lightning.models.fused_norm import (
        FusedQwen3RMSNorm,
        FusedQwen3VLTextRMSNorm,
        fused_rms_norm,
        use_fused_rms_norm,
    )

    layers = tiny_architecture["text"]["num_hidden_layers"]
    vl_norms = [m for m in tiny_bundle.model.modules() if isinstance(m, Qwen3VLTextRMSNorm)]
    assert len(vl_norms) == 4 * layers + 1
    assert all(type(m) is FusedQwen3VLTextRMSNorm for m in vl_norms)
    text_norms = [m for m in tiny_text_bundle.model.modules() if isinstance(m, Qwen3RMSNorm)]
    assert text_norms and all(type(m) is FusedQwen3RMSNorm for m in text_norms)

    norm = tiny_bundle.model.model.language_model.norm
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, norm.weight.shape[0], generator=generator) * 4
    saved = norm.weight.detach().clone()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(saved.shape, generator=generator) + 0.5)  # not all ones; restored below
        try:
            hf = Qwen3VLTextRMSNorm.forward(norm, hidden)
            assert torch.equal(norm(hidden), hf)  # CPU: HF's own code
            torch.testing.assert_close(fused_rms_norm(norm, hidden), hf, rtol=1e-6, atol=1e-6)
            low = hidden.bfloat16()
            bf16 = torch.nn.Module()
            bf16.weight, bf16.variance_epsilon = (
                torch.nn.Parameter(norm.weight.bfloat16()),
                norm.variance_epsilon,
            )
            hf_low = Qwen3VLTextRMSNorm.forward(bf16, low)
            fused_low = fused_rms_norm(bf16, low)
            assert fused_low.dtype == hf_low.dtype == torch.bfloat16
            torch.testing.assert_close(fused_low.float(), hf_low.float(), rtol=2**-7, atol=1e-6)
            mixed = fused_rms_norm(norm, low)  # fp32 weight (mixed precision) over bf16 activations
            assert mixed.dtype == Qwen3VLTextRMSNorm.forward(norm, low).dtype == torch.float32
            torch.testing.assert_close(mixed, Qwen3VLTextRMSNorm.forward(norm, low), rtol=2**-7, atol=1e-6)
        finally:
            norm.weight.copy_(saved)

    hooked = Qwen3VLTextRMSNorm(8)
    hooked._hf_hook = object()  # what accelerate's add_hook_to_module leaves (device_map)
    assert use_fused_rms_norm(hooked) == 0 and type(hooked) is Qwen3VLTextRMSNorm

    plain = load_model(
        kind="vl", random_init=True, architecture=tiny_architecture, seed=0, fused_rms_norm=False
    )
    assert all(
        type(m) is Qwen3VLTextRMSNorm for m in plain.model.modules() if isinstance(m, Qwen3VLTextRMSNorm)
    )
    assert list(plain.model.state_dict()) == list(tiny_bundle.model.state_dict())
    assert type(pickle.loads(pickle.dumps(norm))) is FusedQwen3VLTextRMSNorm


@pytest.mark.gpu
def test_fused_rms_norm_on_cuda_gives_hf_s_norm_within_one_bf16_rounding() -> None:
    """On the GPU the swapped norms run ``F.rms_norm`` where no gradient flows (HF's result within one bf16
    rounding step, HF's dtype under autocast) and HF's code where gradients flow."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRMSNorm

    norm = Qwen3VLTextRMSNorm(64).cuda().bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, device="cuda") + 0.5)
    hidden = torch.randn(4, 9, 64, device="cuda", dtype=torch.bfloat16) * 3
    want = norm(hidden)
    from bbuqc_lightning.models.fused_norm import use_fused_rms_norm

    assert use_fused_rms_norm(norm) == 1
    with torch.no_grad():  # generation, frozen prefix, reference: the fused kernel
        got = norm(hidden)
        with torch.autocast(
            "cuda", torch.bfloat16
        ):  # bf16-mixed: autocast must not turn the output into fp32
            assert norm(hidden).dtype == torch.bfloat16
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-6)
    assert torch.equal(norm(hidden), want)  # gradients flow: HF's own code (training keeps HF's numbers)
