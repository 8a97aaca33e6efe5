"""Fusion file loading (extends, relative paths, located errors) and the sampler: SPEC §9 quotas per
epoch, fail oversampling, determinism by (seed, epoch), disjoint DDP slices, and exact mid-epoch resume
through a real Lightning checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from bbuqc_lightning.fusion_sft.datamodule import FusionDataModule, _pool
from bbuqc_lightning.fusion_sft.fusion_config import FusionConfigError, FusionEntry, load_fusion_config
from bbuqc_lightning.fusion_sft.rows import FusionDataError, read_entry_samples
from bbuqc_lightning.fusion_sft.sampler import FusionSampler, Pool, epoch_quotas
from bbuqc_lightning.models.factory import ModelBundle


def write_chat(path: Path, n: int, prefix: str, fail_every: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = "fail" if fail_every and i % fail_every == 0 else "pass"
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"{prefix} 问题 {i}" + " 详细" * i},  # lengths differ
                    {"role": "assistant", "content": f"{prefix} 回答 {i}"},
                ],
                "label": label,
            }
        )
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def config_errors(path: Path, text: str, **kwargs: Any) -> tuple[Path, str]:
    """Write ``text`` as the fusion file ``path``; its load must fail: ``(path, the error message)``."""
    write_yaml(path, text)
    with pytest.raises(FusionConfigError) as info:
        load_fusion_config(path, **kwargs)
    return path, str(info.value)


# ------------------------------------------------------------------------ fusion files
def test_extends_merges_by_name_and_resolves_paths_per_file(tmp_path: Path) -> None:
    write_yaml(
        tmp_path / "shared" / "base.yaml",
        "fail_oversample: 3.0\n"
        "sources:\n"
        "  - {name: chat, dataset: chat, train_jsonl: chat.jsonl, template: chatml, ratio: 0.5}\n"
        '  - {name: dense, dataset: bbu, train_jsonl: "${data}/bbu.jsonl", template: dense_t, mode: dense, ratio: 0.2}\n',
    )
    child = write_yaml(
        tmp_path / "run" / "mix.yaml",
        "extends: ../shared/base.yaml\n"
        "targets:\n"
        "  - {name: verdicts, dataset: chat, train_jsonl: v.jsonl, val_jsonl: /abs/v_val.jsonl,\n"
        "     template: chatml, ratio: 2.0}\n"
        "sources:\n"
        "  - {name: chat, ratio: 0.25}\n",
    )
    cfg = load_fusion_config(child, {"data": "/data"}, bbu_templates={"dense_t"})
    assert [e.name for e in cfg.targets] == ["verdicts"]
    assert [(e.name, e.ratio) for e in cfg.sources] == [("chat", 0.25), ("dense", 0.2)]
    by_name = {e.name: e for e in cfg.entries}
    assert by_name["chat"].train_jsonl == tmp_path / "shared" / "chat.jsonl"  # relative to base.yaml
    assert by_name["verdicts"].train_jsonl == tmp_path / "run" / "v.jsonl"
    assert by_name["verdicts"].val_jsonl == Path("/abs/v_val.jsonl")
    assert by_name["dense"].train_jsonl == Path("/data/bbu.jsonl")
    assert by_name["verdicts"].fail_oversample == 3.0  # file-wide default inherited from the parent
    assert by_name["dense"].mode == "dense"


def test_every_problem_is_reported_at_once_with_file_and_line(tmp_path: Path) -> None:
    bad, message = config_errors(
        tmp_path / "bad.yaml",
        "targets:\n"
        "  - {name: a, dataset: chat, train_jsonl: a.jsonl, template: summary_bbu, ratio: 1.0}\n"
        "  - {name: b, dataset: images, train_jsonl: b.jsonl, template: chatml, ratio: -1}\n"
        "sources:\n"
        "  - {name: a, dataset: bbu, train_jsonl: c.jsonl, template: nope, mode: caption, ratio: 0.1}\n",
        bbu_templates={"summary_bbu"},
    )
    for expected in (
        f"{bad}:2",
        "needs template: chatml",
        f"{bad}:3",
        "dataset must be one of",
        "ratio must be a number >= 0",
        f"{bad}:5",
        "unknown bbu template 'nope'",
        "mode: one of",
    ):
        assert expected in message
    cycle = write_yaml(tmp_path / "loop.yaml", "extends: loop.yaml\ntargets: []\n")
    with pytest.raises(FusionConfigError, match="extends cycle"):
        load_fusion_config(cycle)


def test_answer_oversample_is_a_pattern_and_a_weight_and_its_errors_name_the_entry(tmp_path: Path) -> None:
    good = write_yaml(
        tmp_path / "good.yaml",
        "targets:\n"
        "  - {name: a, dataset: chat, train_jsonl: a.jsonl, template: chatml, ratio: 1.0,\n"
        "     answer_oversample: {match: '不通过|无法识别', weight: 4}}\n",
    )
    assert load_fusion_config(good).targets[0].answer_oversample == (("不通过|无法识别", 4.0),)
    bad, message = config_errors(
        tmp_path / "bad.yaml",
        "targets:\n"
        "  - {name: a, dataset: chat, train_jsonl: a.jsonl, template: chatml, ratio: 1.0,\n"
        "     answer_oversample: {match: '(不通过', weight: 4}}\n"
        "  - {name: b, dataset: chat, train_jsonl: b.jsonl, template: chatml, ratio: 1.0,\n"
        "     answer_oversample: {match: x, weight: 0}}\n"
        "  - {name: c, dataset: chat, train_jsonl: c.jsonl, template: chatml, ratio: 1.0,\n"
        "     answer_oversample: 4.0}\n",
    )
    assert (
        f"{bad}:2 (targets[0] 'a'): answer_oversample.match '(不通过' is not a regular expression" in message
    )
    assert f"{bad}:4 (targets[1] 'b'): answer_oversample must be" in message and "weight is 0" in message
    assert (
        f"{bad}:6 (targets[2] 'c'): answer_oversample must be" in message
        and "answer_oversample is 4.0" in message
    )


def test_answer_oversampling_weighs_the_rows_whose_answer_matches(caplog: pytest.LogCaptureFixture) -> None:
    entry = FusionEntry("a", "target", "chat", Path("a.jsonl"), None, "chatml", None, 1.0,
                        fail_oversample=2.0, answer_oversample=(("无法识别", 3.0),), where="mix.yaml:3")  # fmt: skip
    texts = [("pass", "标签/可以识别"), ("fail", "标签/无法识别"), ("fail", "电线"), (None, "无法识别")]
    rows = [{"label": label, "messages": [{"role": "assistant", "content": text}]} for label, text in texts]
    rows.append(
        {
            "label": None,
            "messages": [{"role": "assistant", "content": [{"type": "text", "text": "无法识别"}]}],
        }
    )
    assert _pool(entry, rows).weights == (1.0, 6.0, 2.0, 3.0, 3.0)  # fail x answer, fail alone, answer alone
    nowhere = dataclasses.replace(entry, answer_oversample=(("nowhere", 3.0),), fail_oversample=1.0)
    with caplog.at_level(logging.WARNING, logger="bbuqc_lightning.fusion_sft.datamodule"):
        assert _pool(nowhere, rows).weights is None
    assert (
        "a (mix.yaml:3): answer_oversample 'nowhere' matches 0 of 5 rows (weight 3): drawn uniformly"
        in caplog.text
    )


def test_answer_oversample_as_a_list_gives_each_row_its_first_matching_weight(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rare finding above the common ones: 弯曲半径不合理 at 16 even though its summary matches the findings pattern
    too (the order decides, not the larger weight)."""
    mix = write_yaml(
        tmp_path / "mix.yaml",
        "targets:\n"
        "  - {name: a, dataset: chat, train_jsonl: a.jsonl, template: chatml, ratio: 1.0,\n"
        "     answer_oversample: [{match: 弯曲半径不合理, weight: 16}, {match: '不合理|无法识别', weight: 4}]}\n",
    )
    entry = load_fusion_config(mix).targets[0]
    assert entry.answer_oversample == (("弯曲半径不合理", 16.0), ("不合理|无法识别", 4.0))
    texts = ["光纤/弯曲半径不合理", "标签/无法识别", "电线", "光纤/弯曲半径不合理,标签/无法识别"]
    rows = [{"label": None, "messages": [{"role": "assistant", "content": text}]} for text in texts]
    with caplog.at_level(logging.INFO, logger="bbuqc_lightning.fusion_sft.datamodule"):
        assert _pool(entry, rows).weights == (16.0, 4.0, 1.0, 16.0)
    assert "answer_oversample '弯曲半径不合理' matches 2 of 4 rows (weight 16)" in caplog.text
    assert "answer_oversample '不合理|无法识别' matches 1 of 4 rows (weight 4)" in caplog.text
    bad, message = config_errors(
        tmp_path / "bad.yaml",
        "targets:\n"
        "  - {name: a, dataset: chat, train_jsonl: a.jsonl, template: chatml, ratio: 1.0,\n"
        "     answer_oversample: [{match: x, weight: 2}, {match: y, weight: -1}]}\n"
        "  - {name: c, dataset: chat, train_jsonl: c.jsonl, template: chatml, ratio: 1.0,\n"
        "     answer_oversample: [{match: x, weight: 2}, {match: y, weigth: 3}]}\n"
        "  - {name: b, dataset: chat, train_jsonl: b.jsonl, template: chatml, ratio: 1.0, answer_oversample: []}\n",
    )
    assert f"{bad}:2 (targets[0] 'a'): answer_oversample must be" in message
    assert "answer_oversample[1].weight is -1" in message
    assert f"{bad}:6 (targets[2] 'b'): answer_oversample must be" in message and "empty list" in message
    # the misspelt key, without the loader's line marker
    assert (
        f"{bad}:4 (targets[1] 'c'): " in message
        and "answer_oversample[1] is {'match': 'y', 'weigth': 3}" in message
    )


def test_missing_extends_parent_names_the_extending_file(tmp_path: Path) -> None:
    child = write_yaml(tmp_path / "child.yaml", "extends: missing_base.yaml\ntargets: []\n")
    with pytest.raises(
        FusionConfigError, match=rf"^{child}: extends 'missing_base.yaml', but .* does not exist"
    ):
        load_fusion_config(child, {})


def test_embedded_default_file_loads(tmp_path: Path) -> None:
    cfg = load_fusion_config("default", {"synthetic_dir": str(tmp_path)}, {"summary_bbu", "target_dense_bbu"})
    assert [e.name for e in cfg.targets] == ["bbu_summary", "stage_b_distill"]
    assert [e.name for e in cfg.sources] == ["bbu_dense", "lang_chat"]
    assert cfg.targets[1].fail_oversample == 2.0


# ------------------------------------------------------------------------ quotas
POOLS = [
    Pool("summary", "target", 40, 1.0),
    Pool("verdicts", "target", 10, 1.5, weights=tuple(2.0 if i < 3 else 1.0 for i in range(10))),
    Pool("chat", "source", 7, 0.1),
    Pool("dense", "source", 100, 0.25, without_replacement=True),
]


def names_of(sampler: FusionSampler, indices: list[int]) -> Counter[str]:
    bounds = [(int(o), int(o) + p.size, p.name) for o, p in zip(sampler.offsets, sampler.pools, strict=True)]
    return Counter(next(n for lo, hi, n in bounds if lo <= i < hi) for i in indices)


def test_quotas_follow_the_spec_every_epoch() -> None:
    quotas = epoch_quotas(POOLS)
    # targets: round(len x ratio); sources: round(ratio x sum of target quotas) = round(r x 55)
    assert quotas == {"summary": 40, "verdicts": 15, "chat": 6, "dense": 14}
    sampler = FusionSampler(POOLS, seed=3)
    assert len(sampler) == 75
    for epoch in range(3):
        assert names_of(sampler, sampler.epoch_order(epoch)) == quotas
    dense = [i - int(sampler.offsets[3]) for i in sampler.epoch_order(0) if i >= sampler.offsets[3]]
    assert len(set(dense)) == len(dense)  # without replacement: no row twice within the quota


def test_fail_oversampling_shifts_the_share_of_fail_rows() -> None:
    pool = Pool("verdicts", "target", 20, 1.0, weights=tuple(2.0 if i < 5 else 1.0 for i in range(20)))
    sampler = FusionSampler([pool], seed=0)
    drawn = [i for epoch in range(200) for i in sampler.epoch_order(epoch)]
    share = sum(i < 5 for i in drawn) / len(drawn)
    assert share == pytest.approx(10 / 25, abs=0.02)  # 5 rows x 2 / (5 x 2 + 15 x 1); uniform: 0.25


def test_order_is_a_function_of_seed_and_epoch() -> None:
    a, b, c = FusionSampler(POOLS, seed=1), FusionSampler(POOLS, seed=1), FusionSampler(POOLS, seed=2)
    assert a.epoch_order(0) == b.epoch_order(0)
    assert a.epoch_order(0) != a.epoch_order(1)
    assert a.epoch_order(0) != c.epoch_order(0)
    a.set_epoch(4)
    assert list(a) == b.epoch_order(4)


def test_ranks_take_disjoint_equal_slices_of_the_same_epoch() -> None:
    ranks = [FusionSampler(POOLS, seed=5, num_replicas=4, rank=r) for r in range(4)]
    slices = [s.rank_indices(2) for s in ranks]
    assert {len(s) for s in slices} == {75 // 4}
    positions = sorted(p for r in range(4) for p in range(r, 4 * len(slices[r]), 4))
    assert positions == list(range(4 * (75 // 4)))  # every kept position of the epoch list exactly once
    order = ranks[0].epoch_order(2)
    assert [order[p] for p in range(1, 4 * 18, 4)] == slices[1]


def test_resume_starts_at_the_position_also_under_another_world_size() -> None:
    full = FusionSampler(POOLS, seed=7)
    full.set_epoch(1)
    expected = list(full)
    resumed = FusionSampler(POOLS, seed=7)
    resumed.resume(epoch=1, position=20)
    assert list(resumed) == expected[20:]
    assert list(resumed) == expected  # the skip applies once
    halves = [FusionSampler(POOLS, seed=7, num_replicas=2, rank=r) for r in range(2)]
    for s in halves:
        s.resume(epoch=1, position=20, num_replicas=1)  # 20 rows on 1 rank = 10 per rank on 2
    rest = [i for pair in zip(*(list(s) for s in halves), strict=True) for i in pair]
    assert rest == expected[20 : 20 + len(rest)]


# ------------------------------------------------------------------------ Lightning resume
class Recorder(L.LightningModule):
    """Trains one scalar and records which rows every step saw."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[str]] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen.append([Path(s).name for s in batch["sources"]])  # "a.jsonl:7"
        return (self.w - 1.0) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fusion_data(tmp_path: Path, bundle: ModelBundle, **kwargs: Any) -> FusionDataModule:
    write_chat(tmp_path / "a.jsonl", 12, "A", fail_every=3)
    write_chat(tmp_path / "b.jsonl", 5, "B")
    fusion = write_yaml(
        tmp_path / "mix.yaml",
        "targets:\n  - {name: a, dataset: chat, train_jsonl: a.jsonl, template: chatml, ratio: 1.0,"
        " fail_oversample: 2.0}\n"
        "sources:\n  - {name: b, dataset: chat, train_jsonl: b.jsonl, template: chatml, ratio: 0.5}\n",
    )
    return FusionDataModule(str(fusion), bundle.processor, templates={}, seed=11, batch_size=2, **kwargs)


def fit(tmp_path: Path, bundle: ModelBundle, steps: int, ckpt: str | None = None, **data: Any) -> Recorder:
    module = Recorder()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint],
        use_distributed_sampler=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, fusion_data(tmp_path, bundle, **data), ckpt_path=ckpt)
    return module


@pytest.mark.parametrize("grouped", [False, True], ids=["shuffled", "group_by_length"])
def test_lightning_resume_mid_epoch_continues_with_the_next_batch(
    tmp_path: Path, tiny_bundle: ModelBundle, grouped: bool
) -> None:
    # 12 + round(0.5 x 12) = 18 rows per epoch, 9 batches of 2: step 3 is mid-epoch, step 11 in epoch 2.
    data = {"group_by_length": True, "length_group_batches": 2} if grouped else {}
    full = fit(tmp_path / "full", tiny_bundle, steps=12, **data).seen
    if grouped:  # an order of its own: groups of 2 batches, longest first
        assert full != fit(tmp_path / "plain", tiny_bundle, steps=12).seen
    assert Counter(s.split(":")[0] for b in full[:9] for s in b) == {"a.jsonl": 12, "b.jsonl": 6}
    fit(tmp_path / "half", tiny_bundle, steps=3, **data)
    ckpt = tmp_path / "half" / "ckpt" / "epoch=0-step=3.ckpt"
    state = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (state["epoch"], state["position"]) == (0, 6)
    resumed = fit(tmp_path / "half", tiny_bundle, steps=12, ckpt=str(ckpt), **data).seen
    assert resumed == full[3:]
    # The resumed run saved step 9, the last batch of epoch 0: resuming there starts epoch 1 afresh.
    at_epoch_end = tmp_path / "half" / "ckpt" / "epoch=0-step=9.ckpt"
    again = fit(tmp_path / "end", tiny_bundle, steps=12, ckpt=str(at_epoch_end), **data).seen
    assert again == full[9:]


# ------------------------------------------------------------------------ rows
def chat_entry(path: Path, dataset: str = "chat", mode: str | None = None) -> FusionEntry:
    template = "chatml" if dataset == "chat" else "t"
    return FusionEntry("e", "target", dataset, path, None, template, mode, 1.0)  # type: ignore[arg-type]


def test_chat_rows_accept_messages_and_the_coig_shape_and_locate_bad_rows(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"instruction": "介绍一下", "input": "挡风板", "output": "用于导风。"}, ensure_ascii=False)
        + "\n\n"
        + json.dumps(
            {
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "label": "fail",
                "conflict": True,
                "weight": 0.3,
            }
        )
        + "\n",
        encoding="utf-8",
    )
    rows, skipped = read_entry_samples(chat_entry(good), "train", lambda t, m: "")
    assert skipped == 0 and [r["source"] for r in rows] == [f"{good}:1", f"{good}:3"]
    assert rows[0]["messages"][0] == {"role": "user", "content": "介绍一下\n\n挡风板"}
    assert (rows[1]["weight"], rows[1]["label"]) == (0.3, "fail")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}]}\n{"weight": -1}\n', encoding="utf-8")
    with pytest.raises(FusionDataError, match=rf"{bad}:1 \(e\): the last message must be"):
        read_entry_samples(chat_entry(bad), "train", lambda t, m: "")
    assert read_entry_samples(chat_entry(bad), "train", lambda t, m: "", strict=False) == ([], 2)


def test_bbu_rows_take_the_mode_field_and_the_template_prompt(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(b"not decoded here")
    rows_file = tmp_path / "bbu.jsonl"
    row = {
        "images": ["img/a.jpg"],
        "mission": "BBU接地线检查",
        "summary": "电线/捆扎整齐×1",
        "dense": "1. 电线",
    }
    rows_file.write_text(
        json.dumps(row, ensure_ascii=False) + "\n" + json.dumps({**row, "images": ["x.jpg"]}) + "\n"
    )
    prompt = lambda template, mission: f"{template}:{mission}"  # noqa: E731
    with pytest.raises(FusionDataError, match=rf"{rows_file}:2 .*x\.jpg"):
        read_entry_samples(chat_entry(rows_file, "bbu", "dense"), "train", prompt)
    rows, skipped = read_entry_samples(chat_entry(rows_file, "bbu", "dense"), "train", prompt, strict=False)
    assert skipped == 1 and rows[0]["images"] == [str(tmp_path / "img" / "a.jpg")]
    user, answer = rows[0]["messages"]
    assert user["content"] == [{"type": "image"}, {"type": "text", "text": "t:BBU接地线检查"}]
    assert answer == {"role": "assistant", "content": "1. 电线"}


def test_length_grouping_sorts_each_group_keeps_the_epoch_and_resumes_exactly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lengths = [
        int(x)
        for x in torch.randint(
            10, 500, (sum(p.size for p in POOLS),), generator=torch.Generator().manual_seed(0)
        )
    ]
    plain = FusionSampler(POOLS, seed=3)
    grouped = FusionSampler(POOLS, seed=3, lengths=lengths, group_rows=8)
    for epoch in range(2):
        order, shuffled = grouped.epoch_order(epoch), plain.epoch_order(epoch)
        assert sorted(order) == sorted(shuffled)
        groups = [order[i : i + 8] for i in range(0, len(order), 8)]
        assert all([lengths[r] for r in g] == sorted((lengths[r] for r in g), reverse=True) for g in groups)
        assert lengths[order[0]] == max(lengths[r] for r in order)  # the longest batch comes first
        # the groups are the shuffle's 8 consecutive rows, but for the two that swapped the longest row
        chunks = [sorted(shuffled[i : i + 8]) for i in range(0, len(shuffled), 8)]
        assert sum(sorted(g) != c for g, c in zip(groups, chunks, strict=True)) <= 2
    grouped.set_epoch(1)
    expected = list(grouped)
    resumed = FusionSampler(POOLS, seed=3, lengths=lengths, group_rows=8)
    resumed.resume(epoch=1, position=20)
    assert list(resumed) == expected[20:]
    with caplog.at_level(logging.WARNING, logger="bbuqc_lightning.fusion_sft.sampler"):
        plain.check_state(grouped.state(20))
    assert "length groups of 8 rows" in caplog.text
