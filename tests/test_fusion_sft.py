"""Fusion SFT with the real tiny Qwen3-VL: assistant-only labels (text and image rows), mixed batches,
the length guard, init from base + adapter, training runs with LoRA and with full fine-tuning (every
trainable weight moves, nothing else), and the ``+experiment=fusion_sft`` entry point end to end,
including a fully fine-tuned model folder that GRPO and eval start from."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.strategies import SingleDeviceStrategy
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from safetensors.torch import load_file

from bbuqc_lightning.config import config_dir
from bbuqc_lightning.fusion_sft import synthetic_sources
from bbuqc_lightning.fusion_sft.collator import IGNORE_INDEX, SFTCollator, SFTLengthError
from bbuqc_lightning.fusion_sft.datamodule import FusionDataModule, _pool
from bbuqc_lightning.fusion_sft.init import build_trainable_model
from bbuqc_lightning.fusion_sft.loss import weighted_token_mean
from bbuqc_lightning.fusion_sft.module import FusionSFTModule
from bbuqc_lightning.models.factory import ModelBundle, load_model
from bbuqc_lightning.models.lora import apply_last_k_lora
from bbuqc_lightning.train import build_objects, train

IMAGE_PAD_ID = 151655
PROMPTS = {"common": "描述照片。", "missions": {"BBU接地线检查": "任务：{mission}。"}}
LORA = functools.partial(apply_last_k_lora, k=2, r=4, alpha=8, dropout=0.0)


def image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), color).save(path)
    return str(path)


def text_sample(
    answer: str = "不通过\n理由: 图片_2螺丝生锈。", source: str = "chat.jsonl:1"
) -> dict[str, Any]:
    messages = [
        {"role": "system", "content": "你是审核员。"},
        {"role": "user", "content": "请审核工单。"},
        {"role": "assistant", "content": answer},
    ]
    return {
        "messages": messages,
        "images": [],
        "dataset": "chat",
        "weight": 1.0,
        "label": None,
        "source": source,
    }


def image_sample(paths: list[str], answer: str = "电线/捆扎整齐×2") -> dict[str, Any]:
    content = [{"type": "image"} for _ in paths] + [{"type": "text", "text": "描述照片。"}]
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return {
        "messages": messages,
        "images": paths,
        "dataset": "bbu",
        "weight": 1.0,
        "label": None,
        "source": "bbu:1",
    }


def learnt_text(bundle: ModelBundle, batch: dict[str, Any], row: int) -> str:
    labels = batch["labels"][row]
    return bundle.tokenizer.decode(labels[labels != IGNORE_INDEX])


# --------------------------------------------------------------------------- collator
def test_text_sample_learns_only_the_assistant_answer(tiny_bundle: ModelBundle) -> None:
    batch = SFTCollator(tiny_bundle.processor)([text_sample()])
    assert learnt_text(tiny_bundle, batch, 0) == "不通过\n理由: 图片_2螺丝生锈。<|im_end|>"
    prompt = tiny_bundle.tokenizer.decode(batch["input_ids"][0][batch["labels"][0] == IGNORE_INDEX])
    assert "你是审核员。" in prompt and "请审核工单。" in prompt and "<|im_start|>assistant\n" in prompt
    assert "pixel_values" not in batch


def test_image_sample_learns_only_the_answer_and_keeps_the_image_tokens(
    tiny_bundle: ModelBundle, tmp_path: Path
) -> None:
    batch = SFTCollator(tiny_bundle.processor, min_pixels=4096, max_pixels=65536)(
        [image_sample([image(tmp_path / "a.jpg")])]
    )
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert learnt_text(tiny_bundle, batch, 0) == "电线/捆扎整齐×2<|im_end|>"
    n_image_tokens = int(batch["image_grid_thw"][0].prod()) // 4  # 2x2 patches merge into one token
    assert int((ids == IMAGE_PAD_ID).sum()) == n_image_tokens == 4
    assert bool((labels[ids == IMAGE_PAD_ID] == IGNORE_INDEX).all())
    assert bool((batch["mm_token_type_ids"][0][ids == IMAGE_PAD_ID] == 1).all())


def test_mixed_batch_rows_lose_nothing_to_padding(tiny_bundle: ModelBundle, tmp_path: Path) -> None:
    red, blue = image(tmp_path / "r.jpg"), image(tmp_path / "b.png", (0, 0, 250))
    samples = [image_sample([red]), text_sample(), image_sample([red, blue], "标签/可以识别×1")]
    collate = SFTCollator(tiny_bundle.processor, min_pixels=4096, max_pixels=65536)
    batch = collate(samples)
    assert batch["image_grid_thw"].shape == (3, 3)  # 1 + 0 + 2 photos, in row order
    assert batch["datasets"] == ["bbu", "chat", "bbu"]
    lengths = batch["attention_mask"].sum(dim=1)
    for row in range(3):  # right padding: real tokens first
        assert bool(batch["attention_mask"][row, : lengths[row]].all())
    module = FusionSFTModule(tiny(), functools.partial(torch.optim.SGD, lr=0.0), lora=LORA)
    with torch.no_grad():
        sums, counts = module.token_losses(batch)
        alone = [module.token_losses(collate([s])) for s in samples]
    assert torch.isfinite(sums).all()
    for row, (s, c) in enumerate(alone):
        assert int(counts[row]) == int(c[0])
        torch.testing.assert_close(sums[row], s[0], rtol=1e-4, atol=1e-4)


def test_length_guard_errors_with_the_row_or_truncates_and_counts(
    tiny_bundle: ModelBundle, tmp_path: Path
) -> None:
    long = text_sample("通过\n理由: " + "螺丝齐全" * 40, source="distill.jsonl:7")
    with pytest.raises(SFTLengthError, match=r"distill\.jsonl:7 \(chat\): \d+ tokens > data.max_length=40"):
        SFTCollator(tiny_bundle.processor, max_length=40)([long])
    batch = SFTCollator(tiny_bundle.processor, max_length=40, on_overflow="truncate")([long, text_sample()])
    assert batch["input_ids"].shape[1] == 40 and int(batch["num_truncated"]) == 1
    assert learnt_text(tiny_bundle, batch, 0).startswith("通过\n理由: 螺丝")
    photo = image_sample([image(tmp_path / "p.jpg")])
    with pytest.raises(SFTLengthError, match="would cut image tokens"):
        SFTCollator(tiny_bundle.processor, max_length=6, on_overflow="truncate", max_pixels=65536)([photo])


# --------------------------------------------------------------------------- module
def tiny(seed: int = 0) -> ModelBundle:
    arch = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / "tiny.yaml").architecture)
    return load_model(kind="vl", random_init=True, architecture=arch, seed=seed, max_pixels=65536)


def randomise_lora(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def test_init_from_base_plus_adapter_merges_it_or_keeps_training_it(tmp_path: Path) -> None:
    adapter_model = apply_last_k_lora(tiny().model, k=2, r=4, alpha=8, dropout=0.0)
    randomise_lora(adapter_model)
    adapter_model.save_pretrained(str(tmp_path / "adapter"))
    ids = torch.tensor([[151644, 872, 198, 108386, 151645, 198]])
    with torch.no_grad():
        expected = adapter_model(input_ids=ids).logits
    sgd = functools.partial(torch.optim.SGD, lr=0.0)
    merged = FusionSFTModule(tiny(), sgd, lora=LORA, init={"adapter": str(tmp_path / "adapter")})
    with torch.no_grad(), merged.model.disable_adapter():  # the fresh LoRA off: the merged init itself
        torch.testing.assert_close(merged.model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    cont = FusionSFTModule(
        tiny(), sgd, init={"adapter": str(tmp_path / "adapter"), "adapter_mode": "continue"}
    )
    trainable = {n for n, p in cont.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(cont.model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def write_rows(tmp_path: Path) -> Path:
    photos = [image(tmp_path / "img" / f"{i}.jpg", (40 * i, 90, 160)) for i in range(3)]
    bbu = [
        {"images": [f"img/{i}.jpg"], "mission": "BBU接地线检查", "summary": f"电线/捆扎整齐×{i + 1}"}
        for i in range(len(photos))
    ]
    chat = [text_sample(f"通过\n理由: 第{i}张。")["messages"] for i in range(4)]
    files = {
        "bbu.jsonl": bbu,
        "chat.jsonl": [{"messages": m, "label": "fail", "weight": 0.5} for m in chat],
        "coig.jsonl": [{"instruction": "你好", "input": "", "output": "你好！"}],
    }
    for name, rows in files.items():
        (tmp_path / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    fusion = tmp_path / "mix.yaml"
    fusion.write_text(
        "targets:\n"
        "  - {name: summary, dataset: bbu, train_jsonl: bbu.jsonl, val_jsonl: bbu.jsonl, template: s,"
        " mode: summary, ratio: 1.0}\n"
        "  - {name: verdicts, dataset: chat, train_jsonl: chat.jsonl, val_jsonl: chat.jsonl,"
        " template: chatml, ratio: 1.0, fail_oversample: 2.0}\n"
        "sources:\n  - {name: coig, dataset: chat, train_jsonl: coig.jsonl, template: chatml, ratio: 0.3}\n",
        encoding="utf-8",
    )
    return fusion


def fit_on_rows(module: FusionSFTModule, bundle: ModelBundle, tmp_path: Path) -> FusionDataModule:
    """Three steps on :func:`write_rows`, validation at the end; returns the DataModule."""
    data = FusionDataModule(
        str(write_rows(tmp_path)), bundle.processor, {"s": PROMPTS}, batch_size=3, max_pixels=65536
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        val_check_interval=3,
        use_distributed_sampler=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert {"val/loss", "val/loss/summary", "val/loss/verdicts"} <= set(metrics)
    assert any(key.startswith("train/loss/") for key in metrics)
    return data


def test_training_moves_every_lora_weight_and_nothing_else(tmp_path: Path) -> None:
    bundle = tiny()
    module = FusionSFTModule(bundle, functools.partial(torch.optim.AdamW, lr=1e-2), lora=LORA)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    data = fit_on_rows(module, bundle, tmp_path)
    assert data.pools[1].weights == (2.0,) * 4  # every verdict row is a fail row
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".visual." not in n for n in trainable)
    for name, param in module.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == (name in trainable), f"{name}: changed={changed}"


def test_full_finetuning_moves_every_language_model_weight_and_no_vision_weight(tmp_path: Path) -> None:
    bundle = tiny()
    module = FusionSFTModule(bundle, functools.partial(torch.optim.AdamW, lr=1e-3), finetune="full")
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert "model.model.language_model.embed_tokens.weight" in trainable  # tied: lm_head is this weight
    assert not any("lora_" in n for n in before)  # module.lora is not used
    assert frozen and all(".visual." in n for n in frozen)  # vision tower and aligner (merger, deepstack)
    assert any(".merger." in n for n in frozen) and any(".deepstack_merger_list." in n for n in frozen)
    assert all(n.startswith("model.model.language_model.") for n in trainable)
    fit_on_rows(module, bundle, tmp_path)
    for name, param in module.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == (name in trainable), f"{name}: changed={changed}"


def test_full_finetuning_with_freeze_vision_false_moves_the_vision_tower_and_aligner_too(
    tmp_path: Path,
) -> None:
    bundle = tiny()
    adamw = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0)  # only gradients move weights
    module = FusionSFTModule(bundle, adamw, finetune="full", freeze_vision=False)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    assert all(p.requires_grad for p in module.parameters())  # nothing of this VL model is left frozen
    vision = {n for n in before if ".visual." in n}
    assert any(".merger." in n for n in vision) and any(".deepstack_merger_list." in n for n in vision)
    assert any(".blocks." in n for n in vision) and any(".patch_embed." in n for n in vision)
    fit_on_rows(module, bundle, tmp_path)
    unchanged = [n for n, p in module.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"weights that did not move: {unchanged[:5]}"


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_find_unused_parameters_true"])
def test_a_trainable_vision_tower_under_ddp_needs_find_unused_parameters(strategy: str) -> None:
    module = FusionSFTModule(tiny(), torch.optim.AdamW, finetune="full", freeze_vision=False)
    module.trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
    if strategy == "ddp_spawn":
        with pytest.raises(ValueError, match=r"use trainer\.strategy=ddp_find_unused_parameters_true"):
            module.setup("fit")
    else:
        module.setup("fit")


def test_finetune_mode_errors_are_clear(tiny_text_bundle: ModelBundle) -> None:
    with pytest.raises(ValueError, match=r"module.finetune must be one of \('lora', 'full'\), got 'ful'"):
        build_trainable_model(tiny().model, finetune="ful")
    with pytest.raises(ValueError, match="no adapter to continue"):
        build_trainable_model(tiny().model, adapter="any/adapter", adapter_mode="continue", finetune="full")
    with pytest.raises(ValueError, match=r"module\.freeze_vision=false .* needs module\.finetune=full"):
        build_trainable_model(tiny().model, LORA, freeze_vision=False)
    with pytest.raises(
        ValueError, match="this model has no vision tower"
    ):  # raised before any weight is touched
        build_trainable_model(tiny_text_bundle.model, finetune="full", freeze_vision=False)


def test_fusion_sft_experiment_runs_and_writes_an_adapter(
    compose: Callable[[list[str]], DictConfig], tmp_path: Path
) -> None:
    cfg = compose(
        [
            "+experiment=fusion_sft",
            "logger=csv",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false",
            "data.batch_size=2",
            "data.val_batch_size=2",
        ]
    )
    metrics, objects = train(cfg)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert {"val/loss/bbu_summary", "val/loss/stage_b_distill"} <= set(metrics)
    assert objects["datamodule"].dataset_names == ["bbu_summary", "stage_b_distill", "bbu_dense", "lang_chat"]
    assert type(objects["trainer"].strategy) is SingleDeviceStrategy  # fit: Lightning's, unchanged


def test_summary_fail_oversample_draws_the_photos_of_fail_tickets_more_often(
    compose: Callable[[list[str]], DictConfig], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = compose(["+experiment=fusion_sft", "logger=csv", "data.variables.summary_fail_oversample=3.0"])
    data = build_objects(cfg)["datamodule"]
    data.prepare_data()  # writes the synthetic fusion files on first use
    manifest = Path(cfg.data.synthetic_sources.out_dir) / "manifest.json"
    current = manifest.read_text(encoding="utf-8")
    old = {**json.loads(current), "version": 1}  # files from before rows had labels
    for stale in (json.dumps(old), "{not json", None):  # older, unreadable, missing (the files are there)
        if stale is None:
            manifest.unlink()
        else:
            manifest.write_text(stale, encoding="utf-8")
        assert synthetic_sources.is_stale(manifest.parent)
        data.prepare_data()  # ... are written again
        assert manifest.read_text(encoding="utf-8") == current
    data.setup("fit")
    summary = data.pools[0]
    rows = [r for r in data.train_rows if r["dataset"] == "bbu_summary"]
    assert summary.name == "bbu_summary" and len(rows) == summary.size
    labels = [r["label"] for r in rows]  # each photo row carries its ticket's label
    assert set(labels) == {"pass", "fail"}
    assert summary.weights == tuple(3.0 if label == "fail" else 1.0 for label in labels)
    assert (
        data.pools[2].name == "bbu_dense" and data.pools[2].weights is None
    )  # the same file, not oversampled
    entry = dataclasses.replace(data.config.targets[0], fail_oversample=2.0)
    unlabelled = [{**r, "label": None} for r in rows]
    with caplog.at_level(logging.WARNING, logger="bbuqc_lightning.fusion_sft.datamodule"):
        assert _pool(entry, unlabelled).weights is None
    assert f"fail_oversample=2, but none of its {len(rows)} rows is labelled fail" in caplog.text


def test_row_weights_scale_tokens_in_the_loss() -> None:
    sums, counts = torch.tensor([6.0, 40.0, 3.0]), torch.tensor([3.0, 10.0, 1.0])
    assert weighted_token_mean(sums, counts, torch.tensor([1.0, 1.0, 1.0])) == pytest.approx(49 / 14)
    assert weighted_token_mean(sums, counts, torch.tensor([1.0, 0.5, 0.0])) == pytest.approx(26 / 8)
    assert weighted_token_mean(sums, counts, torch.zeros(3)) == 0.0


def test_full_sft_model_folder_starts_grpo_and_eval(
    compose_at: Callable[[list[str], Path, Path], DictConfig], tmp_path: Path, data_dir: Path
) -> None:
    """``module.finetune=full`` writes ``<run>/model``; GRPO and eval load it with ``model.random_init=false``."""

    def run(overrides: list[str], root: Path) -> tuple[dict[str, float], dict[str, Any]]:
        cfg = compose_at([*overrides, "logger=csv", "trainer.enable_progress_bar=false"], root, data_dir)
        try:
            return train(cfg)
        finally:
            HydraConfig.instance().cfg = None

    sft_overrides = ["+experiment=fusion_sft", "module.finetune=full", "module.optimizer.lr=1e-3"]
    limits = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1"]
    _, sft = run([*sft_overrides, *limits, "data.batch_size=2", "data.val_batch_size=2"], tmp_path / "sft")
    folder = tmp_path / "sft" / "run" / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in folder.iterdir()
    }
    assert not (tmp_path / "sft" / "run" / "adapter").exists()
    trained = sft["module"].model.state_dict()
    saved = load_file(folder / "model.safetensors")
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(saved[name], trained[name])
    assert not torch.equal(saved[name], tiny().model.state_dict()[name])  # not the random init

    start = [f"model.model_name_or_path={folder}", "model.random_init=false"]
    short = ["module.grpo.max_new_tokens=4", "module.grpo.num_generations=2"]  # only the start matters here
    metrics, grpo = run(["+experiment=grpo", *start, *short, "trainer.max_steps=1"], tmp_path / "grpo")
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    base = grpo["module"].model.get_base_model().state_dict()
    torch.testing.assert_close(base[name], saved[name])  # GRPO started from the SFT weights
    adapter = tmp_path / "grpo" / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()

    metrics, _ = run(
        [
            "+experiment=eval",
            *start,
            f"module.adapter_path={adapter}",
            "data.limit_samples=4",
            "module.max_new_tokens=8",
        ],
        tmp_path / "eval",
    )
    assert metrics["test/groups"] == 4 and 0.0 <= metrics["test/format_valid_rate"] <= 1.0


def test_group_by_length_batches_rows_of_like_length_from_the_same_epoch(
    compose: Callable[[list[str]], DictConfig], caplog: pytest.LogCaptureFixture
) -> None:
    """Every row's estimated tokens are the tokens the collator gives it (photo rows, verdict rows, chat rows);
    grouping keeps the epoch's rows, cuts the padding of the embedded mix's batches and serves validation rows
    longest first."""
    overrides = ["+experiment=fusion_sft", "logger=csv", "data.batch_size=8", "data.length_group_batches=4"]
    plain = build_objects(compose(overrides))["datamodule"]
    plain.prepare_data()
    plain.setup("fit")
    with caplog.at_level(logging.INFO, logger="bbuqc_lightning.fusion_sft.datamodule"):
        grouped = build_objects(compose([*overrides, "data.group_by_length=true"]))["datamodule"]
        grouped.setup("fit")
    assert "padding in epoch 0's batches of 8" in caplog.text
    lengths = grouped.lengths
    assert lengths is not None and len(lengths) == len(grouped.train_rows)
    for dataset in {r["dataset"] for r in grouped.train_rows}:
        i = next(i for i, r in enumerate(grouped.train_rows) if r["dataset"] == dataset)
        assert lengths[i] == grouped.collator.encode(grouped.train_rows[i]).input_ids.numel(), dataset
    assert any(r["images"] for r in grouped.train_rows)

    def padded_tokens(data: FusionDataModule) -> tuple[int, list[str]]:
        tokens, sources = 0, []
        for batch in data.train_dataloader():
            tokens += batch["input_ids"].numel()
            sources += batch["sources"]
        return tokens, sources

    (plain_tokens, plain_rows), (grouped_tokens, grouped_rows) = padded_tokens(plain), padded_tokens(grouped)
    assert sorted(grouped_rows) == sorted(plain_rows)  # the same draw, in another order
    assert grouped_tokens < 0.8 * plain_tokens
    for rows in grouped.val_rows.values():
        val = [grouped.collator.estimate_length(r) for r in rows]
        assert val == sorted(val, reverse=True)
