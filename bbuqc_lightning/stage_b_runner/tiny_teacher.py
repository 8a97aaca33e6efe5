"""The demo's model for the training-free runner and Teacher distillation: a tiny Qwen3 text model fitted to
the synthetic Stage-B verdicts on first use, cached beside the synthetic data.

A random tiny model never writes a valid two-line verdict, so the embedded demos (``+experiment=stage_b_runner``,
``python tools/distill.py``) would only show invalid answers and an empty ``distill_chatml.jsonl``. This
preset (``model=tiny_teacher``) builds the same tiny architecture as ``model=tiny_text`` and, the first
time, trains all of its weights for ``steps`` AdamW steps (60 by default) on the synthetic train split: each prompt
rendered exactly as the runner renders it (system + user from ``prompts.stage_b``, chat template, thinking
off), the loss on the rule-derived answer of
:func:`~bbuqc_lightning.stage_b.reference_answers.stage_b_rows` and its ``<|im_end|>``. It learns the
two-line format quickly and the verdicts only roughly (the training split is 32 groups): its answers are
valid and its accuracy is what it is; ``metrics.json`` says how good.

The fitted folder (``<synthetic_dir>/tiny_teacher/``, a ``from_pretrained`` folder) is reused while its
``fit.json`` matches the recipe (architecture, seed, steps, learning rate, batch size, the training rows);
anything else refits. Example::

    bundle = load_tiny_teacher(cache_dir="data/synthetic/tiny_teacher", synthetic={...},
                               stage_b_templates=cfg.prompts.stage_b, texts=cfg.prompts.synthetic,
                               architecture=cfg.model.architecture)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bbuqc_lightning.data.synthetic.tree import ensure_synthetic
from bbuqc_lightning.models.factory import ModelBundle, load_model, save_model_folder
from bbuqc_lightning.stage_b.builder import read_stage_a_jsonl
from bbuqc_lightning.stage_b.reference_answers import stage_b_rows

log = logging.getLogger(__name__)

RECIPE_FILE = "fit.json"
END_OF_TURN = "<|im_end|>"


def load_tiny_teacher(
    cache_dir: str | os.PathLike[str],
    synthetic: Mapping[str, Any],
    stage_b_templates: Mapping[str, Any],
    texts: Mapping[str, Any],
    architecture: Mapping[str, Any],
    seed: int = 0,
    steps: int = 60,
    learning_rate: float = 5e-3,
    batch_size: int = 4,
    tokenizer_path: str | None = None,
    name: str = "tiny-teacher",
    kind: str = "text",
    torch_threads: int | None = 1,
) -> ModelBundle:
    """The fitted tiny model: from ``cache_dir`` when its recipe matches, else fitted now and saved there.

    ``torch_threads`` sets torch's intra-op threads for the run (None: leave them): this model's matrices
    are too small to share among threads, and on a busy machine waiting threads cost 2-4x.
    """
    if kind != "text":
        raise ValueError(f"the tiny Teacher is a text model (kind: text), got kind={kind!r}")
    if torch_threads:
        torch.set_num_threads(torch_threads)
    rows = training_rows(synthetic, stage_b_templates, texts)
    recipe = {
        "architecture": json.loads(json.dumps(architecture)),
        "seed": seed,
        "steps": steps,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "rows_sha256": hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest(),
    }
    folder = Path(cache_dir)
    with _no_weight_progress_bars():
        if _cached_recipe(folder) != recipe:
            _fit_into(folder, rows, recipe, tokenizer_path)
        return load_model(kind="text", model_name_or_path=str(folder), dtype="float32", name=name)


@contextlib.contextmanager
def _no_weight_progress_bars() -> Iterator[None]:
    """transformers draws a bar for each save / load; for a 10 MB model it is noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def training_rows(
    synthetic: Mapping[str, Any], stage_b_templates: Mapping[str, Any], texts: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The synthetic train split as chatml rows (prompt as the runner renders it, rule-derived answer)."""
    root = ensure_synthetic(**synthetic)
    records, _ = read_stage_a_jsonl(root / "stage_a_train.jsonl")
    return [{"messages": r["messages"]} for r in stage_b_rows(records, stage_b_templates, texts)]


def _cached_recipe(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / RECIPE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _fit_into(
    folder: Path, rows: list[dict[str, Any]], recipe: dict[str, Any], tokenizer: str | None
) -> None:
    """Fit from random weights and publish the folder atomically (recipe file written last)."""
    start = time.perf_counter()
    log.info("fitting the tiny Teacher on %d synthetic verdicts (%d steps, once)", len(rows), recipe["steps"])
    bundle = load_model(
        kind="text",
        random_init=True,
        architecture=recipe["architecture"],
        seed=recipe["seed"],
        tokenizer_path=tokenizer,
    )
    examples = [encode_row(bundle.tokenizer, row["messages"]) for row in rows]
    loss = fit(bundle.model, examples, recipe, bundle.tokenizer.pad_token_id)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(bundle.model, bundle.tokenizer, tmp)
    (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    log.info(
        "tiny Teacher fitted in %.0f s (final loss %.3f) -> %s", time.perf_counter() - start, loss, folder
    )


def encode_row(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the prompt exactly as the generation engine renders it, then the answer."""
    prompt = tokenizer.apply_chat_template(
        list(messages[:-1]), tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(messages[-1]["content"] + END_OF_TURN, add_special_tokens=False).input_ids
    return prompt_ids, answer_ids


def fit(
    model: torch.nn.Module,
    examples: Sequence[tuple[list[int], list[int]]],
    recipe: Mapping[str, Any],
    pad_id: int,
) -> float:
    """AdamW on every weight, loss on answer tokens only (logits computed only there: the vocabulary is
    152k wide); returns the last loss."""
    rng = random.Random(recipe["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["learning_rate"], weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        for _ in range(recipe["steps"]):
            ids, mask, labels = _batch(rng.sample(examples, min(recipe["batch_size"], len(examples))), pad_id)
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            predicts = torch.zeros_like(labels, dtype=torch.bool)
            predicts[:, :-1] = labels[:, 1:] != -100  # position t predicts token t + 1
            logits = model.lm_head(hidden[predicts])
            loss = torch.nn.functional.cross_entropy(logits, labels[labels != -100])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def _batch(
    items: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 outside the answers)."""
    length = max(len(p) + len(a) for p, a in items)
    ids = torch.full((len(items), length), pad_id)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    labels = torch.full((len(items), length), -100)
    for row, (prompt, answer) in enumerate(items):
        n = len(prompt) + len(answer)
        ids[row, :n] = torch.tensor(prompt + answer)
        mask[row, :n] = 1
        labels[row, len(prompt) : n] = torch.tensor(answer)
    return ids, mask, labels
