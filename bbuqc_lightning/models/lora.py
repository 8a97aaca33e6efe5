"""Freezing, last-K LoRA and full fine-tuning: the trainable boundary of GRPO and fusion SFT.

LoRA (:func:`apply_last_k_lora`, GRPO and the default fusion SFT): only the last ``k`` decoder blocks of
the language model get LoRA adapters; the vision tower (``model.visual``), the aligner (``merger`` and
``deepstack_merger_list``) and everything else stay frozen. peft's ``layers_to_transform`` +
``layers_pattern="layers"`` selects ``model.language_model.layers.{L-k..L-1}``; the vision linears are
named ``qkv``/``proj``/``linear_fc*`` and never match the LLM projection names.

It is built from config like the optimizer (``conf/lora/last_k.yaml``, the one place its defaults live,
``_partial_: true``), and the module calls the partial on its model::

    lora = instantiate(cfg.module.lora)          # functools.partial(apply_last_k_lora, k=4, r=8, alpha=16, ...)
    model = lora(bundle.model)
    first_adapted_layer(model)                   # = L - k: the layers below it are frozen and adapter-free

Full fine-tuning (:func:`train_language_model`, fusion SFT with ``module.finetune=full``): every weight of
the language model trains (embeddings, every decoder block, the final norm, ``lm_head``); the vision tower
and the aligner stay frozen, as with LoRA, unless ``vision=True`` (``module.freeze_vision=false``), which is
for a random-init model trained from scratch: its vision tower has never learned to see, where a pretrained
Qwen3-VL's has and stays frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel

from bbuqc_lightning.models.decoder import base_model, language_model, output_embedding

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def num_text_layers(model: PreTrainedModel) -> int:
    """Number of decoder layers of the language model (VL or text-only)."""
    config = model.config
    text_config = getattr(config, "text_config", config)
    return int(text_config.num_hidden_layers)


def apply_last_k_lora(
    model: PreTrainedModel,
    *,
    k: int,
    r: int,
    alpha: int,
    dropout: float = 0.0,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
) -> PeftModel:
    """Freeze ``model`` and add LoRA adapters to the last ``k`` LLM blocks (``k = L`` means all).

    The product's defaults are in ``conf/lora/last_k.yaml``; callers outside Hydra name ``k``, ``r``, ``alpha``.
    """
    n_layers = num_text_layers(model)
    if not 1 <= k <= n_layers:
        raise ValueError(f"lora k must be in [1, {n_layers}] for this model, got {k}")
    for param in model.parameters():
        param.requires_grad_(False)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        layers_to_transform=list(range(n_layers - k, n_layers)),
        layers_pattern="layers",
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def first_adapted_layer(model: torch.nn.Module) -> int:
    """Index of the first decoder layer that carries a LoRA adapter; layers below it are frozen and plain.

    Read off the adapted model, so it holds whatever built the adapters (a config's ``k``, an adapter loaded with
    ``continue``). Raises ``ValueError`` when no decoder layer has one.
    """
    for index, layer in enumerate(language_model(model).layers):
        if any(isinstance(module, LoraLayer) for module in layer.modules()):
            return index
    raise ValueError("no decoder layer of this model carries a LoRA adapter")


def train_language_model(model: PreTrainedModel, vision: bool = False) -> PreTrainedModel:
    """Freeze ``model``, then let every language-model weight train (``lm_head`` included); returns it.

    The vision tower and the aligner (``model.visual``: the blocks, ``merger``, ``deepstack_merger_list``) stay
    frozen unless ``vision``. For a text-only Qwen3 the language model is every weight; ``vision`` is refused.
    """
    visual = getattr(base_model(model).model, "visual", None)
    if vision and visual is None:
        raise ValueError("module.freeze_vision=false: this model has no vision tower (a text-only Qwen3)")
    for param in model.parameters():
        param.requires_grad_(False)
    for module in (language_model(model), output_embedding(model), *([visual] if vision else [])):
        for param in module.parameters():
            param.requires_grad_(True)
    return model


def trainable_parameter_names(model: PreTrainedModel) -> list[str]:
    """Names of parameters that will receive gradients (for logging and tests)."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def attach_adapter(model: torch.nn.Module, adapter_path: str | Path, merge: bool = True) -> torch.nn.Module:
    """Load a peft LoRA adapter folder onto ``model``; merged into the weights by default (faster decode,
    and the merged model is what production serves). Raises ``FileNotFoundError`` naming the folder."""
    path = Path(adapter_path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"module.adapter_path={path}: no adapter_config.json there; expected the adapter/ folder of a "
            "GRPO or fusion SFT run (outputs/<task>/runs/<run>/adapter)"
        )
    peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    return peft_model.merge_and_unload() if merge else peft_model
