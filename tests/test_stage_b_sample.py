"""The typed Stage-B sample: built from a Stage-A record, fed to the rewards, batched, and written with SPEC keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader, DistributedSampler

from bbuqc_lightning.config import config_dir
from bbuqc_lightning.data.resumable import EpochSampler, ResumableLoader
from bbuqc_lightning.grpo.rollout import score
from bbuqc_lightning.stage_b.builder import build_stage_b_samples, read_stage_a_jsonl
from bbuqc_lightning.stage_b.datamodule import collate_samples
from bbuqc_lightning.stage_b.prompts import load_stage_b_templates
from bbuqc_lightning.stage_b.report import evaluate_outputs
from bbuqc_lightning.stage_b.report_files import MALFORMED, MANUAL_REVIEW, PREDICTIONS
from bbuqc_lightning.stage_b.rewards import false_pass_penalty, format_reward, label_reward
from bbuqc_lightning.stage_b.sample import StageBSample, reward_columns
from bbuqc_lightning.stage_b_runner.distill import distill_row
from bbuqc_lightning.stage_b_runner.guidance import MissionGuidance
from bbuqc_lightning.stage_b_runner.rollout import render_messages, selection_row, trajectory_rows
from bbuqc_lightning.stage_b_runner.selection import Candidate, GroupResult, select_candidate

MISSION = "BBU接地线检查"
S1, S2 = "BBU设备/华为,显示完整×1", "接地线/有标签,连接牢固×1"
SPEC_KEYS = {"messages", "group_id", "ticket_key", "task_type", "group_label", "summaries"}
PASS, FAIL, BAD = "通过\n理由: 图片_2接地线牢固。", "不通过\n理由: 图片_1缺接地线。", "通过。"


def stage_a_line(i: int, label: str | None) -> dict[str, object]:
    gid = f"QC-TEMP-20250118-{i:07d}"
    return {"group_id": gid, "mission": MISSION, "label": label, "images": ["a.jpg", "b.jpg"],
            "per_image": {"image_1": S1, "image_2": S2}}  # fmt: skip


@pytest.fixture
def samples(tmp_path: Path) -> list[StageBSample]:
    path = tmp_path / "stage_a.jsonl"
    lines = [stage_a_line(0, "fail"), stage_a_line(1, "pass"), stage_a_line(2, None)]
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    records, _ = read_stage_a_jsonl(path)
    built, _ = build_stage_b_samples(
        records, load_stage_b_templates(config_dir() / "prompts" / "stage_b.yaml"), None
    )
    return built


def test_a_stage_a_record_becomes_a_typed_sample_with_spec_keys_on_disk(samples: list[StageBSample]) -> None:
    first = samples[0]
    assert isinstance(first, StageBSample)
    assert (first.group_id, first.ticket_key) == (
        "QC-TEMP-20250118-0000000",
        "QC-TEMP-20250118-0000000::fail",
    )
    assert (first.mission, first.label, first.summaries) == (MISSION, "fail", [S1, S2])
    assert samples[2].label is None and samples[2].ticket_key.endswith("::unlabeled")
    line = json.loads(json.dumps(first.to_json(), ensure_ascii=False))  # a JSONL line, read back
    assert set(line) == SPEC_KEYS
    assert (line["task_type"], line["group_label"], line["summaries"]) == (MISSION, "fail", [S1, S2])
    assert line["messages"] == first.messages and [m["role"] for m in first.messages] == ["system", "user"]


def test_reward_columns_feed_the_real_reward_functions(samples: list[StageBSample]) -> None:
    labelled = samples[:2]  # fail, pass
    completions = [PASS, FAIL, PASS, BAD]
    rows = [s for s in labelled for _ in range(2)]  # G = 2 completions per prompt, as a rollout repeats them
    columns = reward_columns(rows)
    assert set(columns) == SPEC_KEYS - {"messages"}
    assert columns["group_label"] == ["fail", "fail", "pass", "pass"]
    assert label_reward(completions, **columns) == [0.0, 1.0, 1.0, 0.0]
    assert format_reward(completions, **columns) == [1.0, 1.0, 1.0, 0.0]
    assert false_pass_penalty(completions, **columns) == [-1.0, 0.0, 0.0, 0.0]
    copied = f"不通过\n理由: 图片_1为{S1}。"  # the summaries column switches the no-copy rule on
    assert format_reward([copied], **reward_columns(labelled[:1])) == [0.0]
    funcs = {"label": label_reward, "format": format_reward, "false_pass": false_pass_penalty}
    expected = torch.tensor([[0.0, 1.0, -1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.equal(score(funcs, completions, rows), expected)  # what GRPO's rollout computes


def test_batches_are_lists_of_samples_under_every_sampler(samples: list[StageBSample]) -> None:
    plain = list(DataLoader(samples, batch_size=2, collate_fn=collate_samples))
    assert plain == [samples[:2], samples[2:]]
    assert move_data_to_device(plain[0], "cpu") == samples[:2]  # a module's default batch transfer
    ranks = [
        [s.ticket_key for b in DataLoader(samples, batch_size=2, sampler=DistributedSampler(samples, 2, r, shuffle=False),
                                          collate_fn=collate_samples) for s in b]
        for r in range(2)
    ]  # fmt: skip
    assert all(isinstance(k, str) for keys in ranks for k in keys) and len(set(ranks[0]) | set(ranks[1])) == 3
    resumable = ResumableLoader(samples, batch_size=2, sampler=EpochSampler(len(samples), 0, True),
                                collate_fn=collate_samples, progress=lambda: 0)  # fmt: skip
    assert sorted(s.ticket_key for b in resumable for s in b) == sorted(s.ticket_key for s in samples)


def test_eval_files_keep_their_keys(samples: list[StageBSample], tmp_path: Path) -> None:
    evaluate_outputs(samples, [PASS, FAIL, BAD], tmp_path, fsync=False)
    read = [json.loads(x) for x in (tmp_path / PREDICTIONS).read_text(encoding="utf-8").splitlines()]
    prediction_keys = {"ticket_key", "group_id", "mission", "label", "output", "verdict", "reason", "valid",
                       "error", "truncated"}  # fmt: skip
    assert [set(r) for r in read] == [prediction_keys] * 3
    assert [(r["mission"], r["label"]) for r in read] == [
        (MISSION, "fail"),
        (MISSION, "pass"),
        (MISSION, None),
    ]
    review = json.loads((tmp_path / MANUAL_REVIEW).read_text(encoding="utf-8"))
    assert set(review) == {"ticket_key", "group_id", "mission", "label", "reason", "source"}
    malformed = json.loads((tmp_path / MALFORMED).read_text(encoding="utf-8"))
    assert set(malformed) == {"ticket_key", "mission", "error", "truncated", "raw_output"}


def test_runner_files_keep_their_keys(samples: list[StageBSample]) -> None:
    sample = samples[0]
    templates = load_stage_b_templates(config_dir() / "prompts" / "stage_b.yaml")
    messages = render_messages(sample, templates, MissionGuidance(MISSION))
    candidates = [Candidate.parse(i, text, sample.summaries) for i, text in enumerate([FAIL, PASS, FAIL])]
    group = GroupResult(sample, messages, 0, 1, candidates, select_candidate(candidates))
    assert (group.mission, group.label, group.ticket_key) == (MISSION, "fail", sample.ticket_key)
    trajectory = trajectory_rows(group, "train")[0]
    assert set(trajectory) == {"epoch", "phase", "mission", "ticket_key", "group_id", "guidance_version",
                               "rollout_index", "raw_text", "verdict", "valid", "error", "truncated"}  # fmt: skip
    selection = selection_row(group, "train")
    assert set(selection) == {"epoch", "phase", "mission", "ticket_key", "group_id", "label", "guidance_version",
                              "verdict", "valid", "selected_index", "vote_strength", "votes", "label_match",
                              "conflict_flag", "disagreement", "answer"}  # fmt: skip
    assert (selection["mission"], selection["label"], selection["group_id"]) == (
        MISSION,
        "fail",
        sample.group_id,
    )
    row, outcome = distill_row(group, "drop", 0.5, {})
    assert outcome == "kept" and row is not None
    assert set(row) == {"messages", "ticket_key", "group_id", "mission", "label", "verdict", "teacher_verdict",
                        "weight", "conflict", "flipped", "vote_strength", "guidance_version"}  # fmt: skip
    assert (row["mission"], row["label"]) == (MISSION, "fail")
