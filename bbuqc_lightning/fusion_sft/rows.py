"""One fusion entry's JSONL rows -> chat samples the SFT collator can tokenise.

Row shapes (one JSON object per line; blank lines are skipped):

``dataset: chat`` (``template: chatml``) — text only:

- ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``, ending with an
  assistant turn. This is what the Teacher distillation writes (``distill_chatml.jsonl``, with
  ``ticket_key``, ``mission``, ``label``, optional ``conflict`` and ``weight``) and what chat corpora
  in chatml form look like.
- ``{"instruction": str, "input": str (optional), "output": str, "system": str (optional)}``: the
  native COIG-CQIA / Alpaca shape, accepted as is: user = instruction (+ a blank line + input when
  non-empty), assistant = output.

``dataset: bbu`` — image + text, one row per photo (several photos are allowed):

- ``{"images": [path, ...], "mission": str, "summary": str, "dense": str}``: the entry's ``mode``
  picks the answer field (``summary``: the Stage-A one-line summary; ``dense``: a longer, one object
  per line caption), the entry's ``template`` picks the prompt for the mission. One file can serve a
  summary target and a dense source. Relative image paths are relative to the JSONL file's folder.
- ``{"images": [...], "messages": [...]}``: explicit turns; user contents are lists with one
  ``{"type": "image"}`` item per image, in order (then ``mode`` and ``template`` are not used).

Every row may carry ``weight`` (>= 0, default 1: scales the row's tokens in the loss; the distiller's
conflict-marked rows use it) and ``label`` (``pass``/``fail``: fail rows can be oversampled).
A bad row is a :class:`FusionDataError` naming ``file:line`` (or, with ``strict=False``, a logged,
counted skip).

A sample is a plain dict (DataLoader-friendly)::

    {"messages": [...], "images": ["/abs/IMG_1.jpg"], "dataset": "bbu_summary", "weight": 1.0,
     "label": None, "source": "/data/fusion/bbu_train.jsonl:17"}
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bbuqc_lightning.constants import LABELS
from bbuqc_lightning.data.jsonl import JsonlError, parse_line
from bbuqc_lightning.fusion_sft.fusion_config import FusionEntry

log = logging.getLogger(__name__)

PromptFn = Callable[[str, str], str]
"""``prompt_fn(template, mission) -> prompt`` for ``dataset: bbu`` rows (the DataModule provides it)."""

ROLES = ("system", "user", "assistant")


class FusionDataError(ValueError):
    """A fusion JSONL row that cannot be used; the message starts with ``file:line``."""


def read_entry_samples(
    entry: FusionEntry,
    split: str,
    prompt_fn: PromptFn,
    strict: bool = True,
    check_images: bool = True,
) -> tuple[list[dict[str, Any]], int]:
    """The samples of ``entry``'s ``train`` or ``val`` file; returns ``(samples, skipped)``."""
    path = entry.train_jsonl if split == "train" else entry.val_jsonl
    if path is None:
        return [], 0
    samples: list[dict[str, Any]] = []
    skipped = 0
    with Path(path).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                samples.append(_sample(entry, raw, Path(path), number, prompt_fn, check_images))
            except FusionDataError as err:
                if strict:
                    raise
                log.warning("skipping %s", err)
                skipped += 1
    if skipped:
        log.warning("%s (%s): skipped %d bad row(s), kept %d", path, entry.name, skipped, len(samples))
    return samples, skipped


def _sample(
    entry: FusionEntry, raw: bytes, path: Path, number: int, prompt_fn: PromptFn, check_images: bool
) -> dict[str, Any]:
    source = f"{path}:{number}"
    try:
        row = parse_line(path, number, raw)
    except JsonlError as err:
        raise FusionDataError(str(err)) from err
    try:
        if entry.dataset == "chat":
            messages, images = chat_messages(row), []
        else:
            images = _image_paths(row, path.parent, check_images)
            messages = bbu_messages(row, entry, len(images), prompt_fn)
        weight, label = _weight(row), row.get("label")
        if label is not None and label not in LABELS:
            raise ValueError(f"label must be one of {list(LABELS)} or null, got {label!r}")
    except (ValueError, KeyError, TypeError) as err:
        raise FusionDataError(f"{source} ({entry.name}): {err}") from err
    return {
        "messages": messages,
        "images": images,
        "dataset": entry.name,
        "weight": weight,
        "label": label,
        "source": source,
    }


def chat_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """``messages`` as given (validated), or built from ``instruction`` / ``input`` / ``output``."""
    if "messages" in row:
        messages = row["messages"]
        _check_turns(messages, text_only=True)
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" in row and "output" in row:
        prompt = _text(row, "instruction")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError(f"'input' must be a string, got {type(extra).__name__}")
        user = f"{prompt}\n\n{extra}" if extra.strip() else prompt
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output")}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": _text(row, "system")})
        return messages
    raise ValueError("a chat row needs 'messages' or 'instruction' + 'output'")


def bbu_messages(row: dict[str, Any], entry: FusionEntry, n_images: int, prompt_fn: PromptFn) -> list[dict]:
    """User turn (one image item per photo + the template's prompt) and the ``mode`` field as answer."""
    if "messages" in row:
        messages = row["messages"]
        _check_turns(messages, text_only=False)
        found = sum(
            1
            for m in messages
            if isinstance(m["content"], list)
            for item in m["content"]
            if isinstance(item, dict) and item.get("type") == "image"
        )
        if found != n_images:
            raise ValueError(f"{found} image item(s) in messages for {n_images} image(s)")
        return messages
    mission = _text(row, "mission")
    assert entry.mode is not None
    answer = _text(row, entry.mode)
    prompt = prompt_fn(entry.template, mission)
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


def _check_turns(messages: Any, text_only: bool) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] needs a role in {list(ROLES)}, got {message!r}")
        content = message.get("content")
        if isinstance(content, str) or (not text_only and isinstance(content, list)):
            continue
        raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
        raise ValueError("the last message must be a non-empty assistant turn (it is what is learnt)")
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("messages have no user turn")


def _image_paths(row: dict[str, Any], folder: Path, check: bool) -> list[str]:
    images = row.get("images")
    if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
        raise ValueError("a bbu row needs 'images': a non-empty list of paths")
    paths = [Path(p).expanduser() for p in images]
    paths = [p if p.is_absolute() else folder / p for p in paths]
    missing = [str(p) for p in paths if check and not p.is_file()]
    if missing:
        raise ValueError(f"image file(s) not found: {', '.join(missing)}")
    return [str(p) for p in paths]


def _text(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key!r} must be a non-empty string, got {value!r}")
    return value


def _weight(row: dict[str, Any]) -> float:
    value = row.get("weight", 1.0)
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"weight must be a finite number >= 0, got {value!r}")
    return float(value)
