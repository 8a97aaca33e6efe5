"""Where the fusion SFT starts from, and its trainable boundary (LoRA on the top K LLM layers, or full).

Three starting points (SPEC §9: "init from an existing checkpoint, the summary model"):

1. a base folder or hub id: ``model.model_name_or_path=/models/Qwen3-VL-4B-Instruct``;
2. a merged folder (``tools/export.py`` output, or the ``model/`` folder of a full fine-tuning run): the
   same key, the folder loads like a base;
3. a base + a peft adapter: ``module.init.adapter=/runs/summary/adapter`` with
   ``module.init.adapter_mode``:
   - ``merge`` (default): the adapter is merged into the weights, then fresh LoRA is added on the last
     K layers — the summary model becomes the new base, and the output adapter applies to it;
   - ``continue``: the adapter itself keeps training (its own layers and rank; ``module.lora`` is not
     used), so base + one adapter stays the deployable pair.

Two trainable boundaries (``module.finetune``):

- ``lora`` (default): only LoRA weights train (``module.lora``: the last K layers, rank, alpha);
- ``full``: every language-model weight trains — embeddings, every decoder layer, the final norm and
  ``lm_head`` — and ``module.lora`` is not used. For models that LoRA cannot move far enough, e.g. a
  random-init model trained from scratch (``bench/learning_proof.py``). An init adapter is merged first;
  ``continue`` is refused (there is no adapter left to continue).

Either way the vision tower and the aligner (``merger``, ``deepstack_merger_list``) stay frozen, and a
``continue`` adapter that touches them is refused. The one exception is ``module.freeze_vision=false`` with
``finetune=full``: the tower and aligner train too. That is for a random-init model trained from scratch (the
drift-and-cure base), whose tower has never been trained; a pretrained Qwen3-VL's tower already sees, and the
product keeps it frozen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from peft import PeftModel
from transformers import PreTrainedModel

from bbuqc_lightning.models.lora import train_language_model, trainable_parameter_names

log = logging.getLogger(__name__)

ADAPTER_MODES = ("merge", "continue")
FINETUNE_MODES = ("lora", "full")


def build_trainable_model(
    model: PreTrainedModel,
    lora: Callable[[PreTrainedModel], PeftModel] | None = None,
    adapter: str | None = None,
    adapter_mode: str = "merge",
    finetune: str = "lora",
    freeze_vision: bool = True,
) -> PeftModel | PreTrainedModel:
    """``model`` ready for SFT: LoRA from the ``lora`` partial (``conf/lora/last_k.yaml``: the last K layers) or,
    with ``finetune="full"``, the whole language model trainable (and the vision tower and aligner with
    ``freeze_vision=False``); optionally starting from an adapter."""
    if adapter_mode not in ADAPTER_MODES:
        raise ValueError(f"module.init.adapter_mode must be one of {ADAPTER_MODES}, got {adapter_mode!r}")
    if finetune not in FINETUNE_MODES:
        raise ValueError(f"module.finetune must be one of {FINETUNE_MODES}, got {finetune!r}")
    if finetune == "full":
        return _full(model, adapter, adapter_mode, freeze_vision)
    if not freeze_vision:
        raise ValueError(
            "module.freeze_vision=false trains the vision tower and aligner in full; it needs module.finetune=full "
            "(LoRA adapts only the last K LLM layers)"
        )
    if adapter is None or adapter_mode == "merge":
        if lora is None:
            raise ValueError("module.finetune=lora needs module.lora (conf/lora/last_k.yaml)")
        if adapter is None:
            return lora(model)
        log.info("merging the init adapter %s into the base, then adding LoRA", adapter)
        return lora(PeftModel.from_pretrained(model, adapter).merge_and_unload())
    log.info("continuing to train the init adapter %s (module.lora is not used)", adapter)
    peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    touched = [n for n in trainable_parameter_names(peft_model) if _in_vision(n)]
    if touched:
        raise ValueError(
            f"the init adapter {adapter} trains vision/aligner weights ({touched[:3]}...); they must stay "
            "frozen: use module.init.adapter_mode=merge"
        )
    return peft_model


def _full(
    model: PreTrainedModel, adapter: str | None, adapter_mode: str, freeze_vision: bool
) -> PreTrainedModel:
    if adapter is not None:
        if adapter_mode == "continue":
            raise ValueError(
                "module.finetune=full trains the whole language model: there is no adapter to continue; "
                "use module.init.adapter_mode=merge (the adapter is folded into the weights first)"
            )
        log.info("merging the init adapter %s into the base before full fine-tuning", adapter)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    log.info(
        "full fine-tuning: every language-model weight trains%s (module.lora is not used)",
        "" if freeze_vision else ", and the vision tower and aligner",
    )
    return train_language_model(model, vision=not freeze_vision)


def _in_vision(name: str) -> bool:
    parts = name.split(".")
    return "visual" in parts
