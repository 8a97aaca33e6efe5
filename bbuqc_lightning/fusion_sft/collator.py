"""Collate fusion samples (some with photos, some text only) into one SFT batch.

Each sample goes through ``processor.apply_chat_template`` with the project's chatml template
(``models/chat_template.py``), whose ``{% generation %}`` markers give the assistant-token mask: the
loss sees only what the assistant says (its text and the closing ``<|im_end|>``), never the system or
user turns, the image tokens or the padding. Photos are opened with
:func:`~bbuqc_lightning.data.images.load_image` (EXIF rotation, decompression-bomb guard, pixel bounds)
and expanded by the processor into their ``<|image_pad|>`` tokens. Samples are encoded one by one and
right-padded here, so a batch can mix image and text rows freely; ``pixel_values`` and
``image_grid_thw`` hold the batch's photos in row order (absent when no row has one).

Length guard (``max_length`` tokens per sample, after image expansion):

- ``on_overflow: error`` (default): a :class:`SFTLengthError` naming the row (``file:line``) and the
  entry, with what to change;
- ``on_overflow: truncate``: the tail is cut and counted (``batch["num_truncated"]``, logged as
  ``train/truncated``); a row whose image tokens or whole answer would be cut is still an error,
  because training on it would teach nothing or break the image/token alignment.

Example::

    collate = SFTCollator(bundle.processor, max_length=2048)
    batch = collate([{"messages": [...], "images": ["IMG_1.jpg"], "dataset": "bbu_summary",
                      "weight": 1.0, "label": None, "source": "bbu_train.jsonl:1"}])
    batch["input_ids"], batch["labels"]  # labels are -100 outside assistant tokens
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image

from bbuqc_lightning.data.images import (
    DECODE_ERRORS,
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageError,
    load_image,
    target_size,
)

IGNORE_INDEX = -100


class SFTLengthError(ValueError):
    """A sample longer than ``max_length`` that cannot be used as is; names the row."""


@dataclass
class Encoded:
    """One tokenised sample before padding."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    truncated: bool


class SFTCollator:
    """``collate(samples) -> batch`` for :class:`~bbuqc_lightning.fusion_sft.module.FusionSFTModule`."""

    def __init__(
        self,
        processor: Any,
        max_length: int | None = 2048,
        on_overflow: Literal["error", "truncate"] = "error",
        min_pixels: int = 4096,
        max_pixels: int = 1024 * 768,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if on_overflow not in ("error", "truncate"):
            raise ValueError(f"on_overflow must be 'error' or 'truncate', got {on_overflow!r}")
        self.processor = processor
        self.pad_token_id = int(getattr(processor, "tokenizer", processor).pad_token_id)
        self.max_length = max_length
        self.on_overflow = on_overflow
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.max_image_pixels = max_image_pixels

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        encoded = [self.encode(s) for s in samples]
        batch = self._pad(encoded)
        batch["weights"] = torch.tensor([float(s.get("weight", 1.0)) for s in samples])
        batch["datasets"] = [s["dataset"] for s in samples]
        batch["sources"] = [s.get("source", "?") for s in samples]
        batch["num_truncated"] = torch.tensor(sum(e.truncated for e in encoded))
        return batch

    def encode(self, sample: dict[str, Any]) -> Encoded:
        """Tokenise one sample; labels keep only assistant tokens."""
        where = f"{sample.get('source', '?')} ({sample.get('dataset', '?')})"
        try:
            images = [
                load_image(p, self.min_pixels, self.max_pixels, self.max_image_pixels)
                for p in sample["images"]
            ]
        except ImageError as err:
            raise ImageError(f"{where}: {err}") from err
        messages = attach_images(sample["messages"], images)
        out = self.processor.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            return_tensors="pt",
        )
        input_ids = out["input_ids"][0]
        mask = torch.as_tensor(out["assistant_masks"][0], dtype=torch.bool)
        if not mask.any():
            raise SFTLengthError(f"{where}: no assistant tokens (the chat template lost the answer)")
        labels = torch.where(mask, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        mm_types = out.get("mm_token_type_ids")
        mm_types = mm_types[0] if mm_types is not None else torch.zeros_like(input_ids)
        enc = Encoded(
            input_ids, labels, mm_types, out.get("pixel_values"), out.get("image_grid_thw"), truncated=False
        )
        return self._guard_length(enc, where)

    def estimate_length(self, sample: dict[str, Any]) -> int:
        """The tokens :meth:`encode` gives ``sample``, before any truncation, without decoding its photos: the chat
        template's text tokenised (one ``<|image_pad|>`` per photo), plus each photo's patch grid as the image
        processor would cut it from the size :func:`~bbuqc_lightning.data.images.load_image` resizes it to (read
        from the file's header; EXIF rotation swaps the sides, which leaves the count alone). What
        ``data.group_by_length`` sorts by; a photo it cannot read counts as one token (``encode`` then names it)."""
        text = self.processor.apply_chat_template(sample["messages"], tokenize=False)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        image_processor = getattr(self.processor, "image_processor", None)
        if image_processor is None:
            return n
        merge = int(image_processor.merge_size) ** 2
        for path in sample.get("images") or []:
            try:
                with Image.open(path) as img:
                    width, height = target_size(*img.size, self.min_pixels, self.max_pixels)
            except DECODE_ERRORS:
                continue
            n += image_processor.get_number_of_image_patches(height, width, {}) // merge - 1
        return n

    def _guard_length(self, enc: Encoded, where: str) -> Encoded:
        n = int(enc.input_ids.numel())
        if self.max_length is None or n <= self.max_length:
            return enc
        if self.on_overflow == "error":
            raise SFTLengthError(
                f"{where}: {n} tokens > data.max_length={self.max_length}; raise data.max_length, "
                "lower the image size (model.max_pixels) or set data.on_overflow=truncate"
            )
        keep = self.max_length
        if bool((enc.mm_token_type_ids[keep:] != 0).any()):
            raise SFTLengthError(f"{where}: {n} tokens; truncating to {keep} would cut image tokens")
        if not bool((enc.labels[:keep] != IGNORE_INDEX).any()):
            raise SFTLengthError(f"{where}: the prompt alone fills data.max_length={keep} ({n} tokens)")
        return Encoded(
            enc.input_ids[:keep],
            enc.labels[:keep],
            enc.mm_token_type_ids[:keep],
            enc.pixel_values,
            enc.image_grid_thw,
            truncated=True,
        )

    def _pad(self, encoded: list[Encoded]) -> dict[str, Any]:
        length = max(int(e.input_ids.numel()) for e in encoded)
        rows = len(encoded)
        input_ids = torch.full((rows, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((rows, length), dtype=torch.long)
        mm_types = torch.zeros((rows, length), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = int(e.input_ids.numel())
            input_ids[i, :n] = e.input_ids
            labels[i, :n] = e.labels
            attention_mask[i, :n] = 1
            mm_types[i, :n] = e.mm_token_type_ids
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "mm_token_type_ids": mm_types,
        }
        pixels = [e.pixel_values for e in encoded if e.pixel_values is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
            batch["image_grid_thw"] = torch.cat(
                [e.image_grid_thw for e in encoded if e.image_grid_thw is not None]
            )
        return batch


def attach_images(messages: list[dict[str, Any]], images: list[Any]) -> list[dict[str, Any]]:
    """A copy of ``messages`` whose ``{"type": "image"}`` items carry the loaded images, in order."""
    out = copy.deepcopy(messages)
    pending = list(images)
    for message in out:
        if not isinstance(message["content"], list):
            continue
        for item in message["content"]:
            if isinstance(item, dict) and item.get("type") == "image":
                if not pending:
                    raise ValueError("more image items in the messages than images in the row")
                item["image"] = pending.pop(0)
    if pending:
        raise ValueError(f"{len(pending)} image(s) of the row have no image item in the messages")
    return out
