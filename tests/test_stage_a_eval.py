"""Stage-A scoring (SPEC §6) on hand-written pairs: a missing object, a wrong attribute, a wrong count,
reordered objects, ``无关图片`` both ways, malformed output; then the files, per-mission keys and the
``+experiment=stage_a`` run that scores itself against the synthetic references."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from bbuqc_lightning.summaries.grammar import parse_summary
from bbuqc_lightning.summaries.scoring import (
    StageAScores,
    read_summaries,
    resolve_reference,
    score_line,
    score_stage_a_files,
    synthetic_reference,
)

SCREWS = "螺丝、光纤插头/BBU安装螺丝,显示完整,符合要求×3"
BBU = "BBU设备/华为,显示完整,机柜空间充足需要安装/这个BBU设备未按要求配备挡风板×2"
FIBRE = "光纤/有保护措施,弯曲半径合理/蛇形管×2"
REF = "，".join([BBU, SCREWS, FIBRE, "备注: 无法判断是否有足够空间安装挡风板"])  # 4 items


def test_the_spec_example_parses_into_objects_count_and_remark() -> None:
    line = parse_summary(REF + "，标签/可以识别×7")
    kinds = [o.kind for o in line.objects]
    assert kinds == ["BBU设备", "螺丝、光纤插头", "光纤"]  # the remark's free text swallows what follows
    assert line.objects[0].conditional == ("这个BBU设备未按要求配备挡风板",)
    assert (
        line.objects[1].attributes == ("BBU安装螺丝", "显示完整", "符合要求") and line.objects[1].count == 3
    )
    assert line.remark == "无法判断是否有足够空间安装挡风板，标签/可以识别×7"
    assert parse_summary("备注：看不清").remark == "看不清" and not parse_summary("备注：看不清").objects


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        (REF, (4, 4, 4, True, True)),
        # missing object: recall 3/4, precision 3/3
        ("，".join([BBU, FIBRE, "备注: 无法判断是否有足够空间安装挡风板"]), (3, 3, 4, False, True)),
        # wrong attribute (不符合要求 for 符合要求): one wrong object and one missed reference object
        (REF.replace(SCREWS, SCREWS.replace("符合要求", "不符合要求")), (3, 4, 4, False, True)),
        # wrong count
        (REF.replace("×3", "×2"), (3, 4, 4, False, True)),
        # reordered objects: every object matches, the line is not an exact match
        ("，".join([FIBRE, SCREWS, BBU, "备注: 无法判断是否有足够空间安装挡风板"]), (4, 4, 4, False, True)),
        # remark dropped
        ("，".join([BBU, SCREWS, FIBRE]), (3, 3, 4, False, True)),
        # not the grammar at all: one unparsed item, nothing matches
        ("一台华为BBU和三颗螺丝", (0, 1, 4, False, True)),
        # 无关图片 where there is equipment: wrong both on objects and on irrelevance
        ("无关图片", (0, 0, 4, False, False)),
    ],
    ids=["equal", "missing", "wrong_attr", "wrong_count", "reordered", "no_remark", "garbage", "irrelevant"],
)
def test_score_line_on_hand_written_pairs(generated: str, expected: tuple) -> None:
    assert score_line(REF, generated) == expected


def test_irrelevant_is_right_both_ways_and_an_ascii_comma_after_a_count_still_separates() -> None:
    assert score_line("无关图片", "无关图片") == (0, 0, 0, True, True)
    assert score_line("无关图片", FIBRE) == (0, 1, 0, False, False)
    assert score_line(f"{FIBRE}，{SCREWS}", f"{FIBRE},{SCREWS}")[:3] == (2, 2, 2)


def test_micro_rates_per_mission_and_the_worst_lines() -> None:
    scores = StageAScores()
    scores.add_group("A::fail", "挡风板安装检查", {"图片_1": REF, "图片_2": "无关图片"}, {"图片_1": REF})
    scores.add_group("B::pass", "BBU线缆布放要求", {"图片_1": FIBRE}, {"图片_1": FIBRE, "图片_2": SCREWS})
    m = scores.metrics()
    # items: A/1 4 of 4; A/2 missing -> "" (0 items, not irrelevant); B/1 1 of 1; B/2 extra: 1 wrong item
    assert m["stage_a/object_precision"] == pytest.approx(5 / 6)
    assert m["stage_a/object_recall"] == pytest.approx(5 / 5)
    assert m["stage_a/object_f1"] == pytest.approx(2 * 5 / 11)
    assert m["stage_a/exact_match"] == pytest.approx(2 / 4)
    assert m["stage_a/irrelevant_accuracy"] == pytest.approx(3 / 4)
    assert (
        m["stage_a/object_f1/baffle_installation"] == 1.0
        and m["stage_a/exact_match/baffle_installation"] == 0.5
    )
    assert m["stage_a/object_precision/bbu_cabling"] == 0.5
    assert "stage_a/object_f1/bbu_grounding" not in m  # no images of that mission: no rate, never a 0
    assert (m["stage_a/scored_images"], m["stage_a/scored_groups"]) == (4.0, 2.0)
    worst = scores.worst(2)
    assert [(w.ticket_key, w.image) for w in worst] == [("A::fail", "图片_2"), ("B::pass", "图片_2")]


def test_negative_item_recall_counts_the_seed_s_negative_items_the_summary_keeps() -> None:
    """``stage_a/negative_item_recall``: of the negative items the references name (once per image), the share the
    generated line names too; a line without one does not count, and a mission without one has no rate."""
    bad_fibre = "光纤/无保护措施,弯曲半径不合理/蛇形管×1"  # two negative items on one object
    labels = "标签/无法识别×2"
    scores = StageAScores()
    scores.add_group(
        "A::fail",
        "BBU线缆布放要求",
        {"图片_1": f"{bad_fibre}，{labels}", "图片_2": BBU, "图片_3": SCREWS},
        # keeps 无保护措施 and the baffle; softens 弯曲半径 and drops the unreadable labels; a negative item
        # the reference does not name (不符合要求 on the screws) is not a recall hit
        {
            "图片_1": "光纤/无保护措施,弯曲半径合理/蛇形管×1",
            "图片_2": BBU,
            "图片_3": SCREWS.replace("符合", "不符合"),
        },
    )
    scores.add_group("B::pass", "挡风板安装检查", {"图片_1": FIBRE}, {"图片_1": FIBRE})
    m = scores.metrics()
    assert m["stage_a/negative_item_recall"] == pytest.approx(2 / 4)  # 无保护措施, 挡风板 of 4 named
    assert m["stage_a/negative_item_recall/bbu_cabling"] == pytest.approx(2 / 4)
    assert "stage_a/negative_item_recall/baffle_installation" not in m  # nothing negative to recall there


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _row(group: str, label: str, summaries: list[str], legacy: bool = False) -> dict:
    prefix = "image_" if legacy else "图片_"
    return {
        "group_id": group,
        "ticket_key": f"{group}::{label}",
        "mission": "BBU线缆布放要求",
        "label": label,
        "images": [f"{i}.jpg" for i in range(len(summaries))],
        "per_image": {f"{prefix}{i}": s for i, s in enumerate(summaries, start=1)},
    }


def test_files_count_missing_and_unreferenced_tickets(tmp_path: Path) -> None:
    ref = _write(
        tmp_path / "ref.jsonl",
        [_row("QC-A-20250101-1", "fail", [FIBRE]), _row("QC-A-20250101-2", "pass", [SCREWS])],
    )
    gen = _write(
        tmp_path / "gen.jsonl",
        [_row("QC-A-20250101-1", "fail", [FIBRE], legacy=True), _row("QC-A-20250101-9", "pass", [FIBRE])],
    )
    scores = score_stage_a_files(gen, ref)
    m = scores.metrics()
    assert m["stage_a/object_f1"] == 1.0 and m["stage_a/exact_match/bbu_cabling"] == 1.0
    assert (m["stage_a/missing_groups"], m["stage_a/unreferenced_groups"]) == (1.0, 1.0)


def test_a_per_photo_summary_file_is_a_reference_matched_by_photo_path(tmp_path: Path) -> None:
    """A team's summary ``val_jsonl`` (fusion ``dataset: bbu`` rows) references the tickets whose photos it has."""
    from bbuqc_lightning.data.tree import GroupRecord
    from bbuqc_lightning.summaries.scoring import read_reference

    photos = tmp_path / "photos"
    photos.mkdir()
    a, b, c = (photos / f"{n}.jpg" for n in "abc")
    records = [
        GroupRecord("QC-A-20250101-1", "QC-A-20250101-1::fail", "BBU线缆布放要求", "fail", (a, b), ("t1",)),
        GroupRecord("QC-A-20250101-2", "QC-A-20250101-2::pass", "BBU线缆布放要求", "pass", (c,), ("t2",)),
    ]
    rows = [{"images": ["photos/a.jpg"], "mission": "BBU线缆布放要求", "summary": FIBRE, "dense": ""},
            {"images": [str(b)], "mission": "BBU线缆布放要求", "summary": "无关图片", "dense": ""}]  # fmt: skip
    reference = read_reference(_write(tmp_path / "bbu_val.jsonl", rows), records)
    assert reference == {
        "QC-A-20250101-1::fail": {
            "mission": "BBU线缆布放要求",
            "per_image": {"图片_1": FIBRE, "图片_2": "无关图片"},
        }
    }
    gen = _write(tmp_path / "gen.jsonl", [_row("QC-A-20250101-1", "fail", [FIBRE, SCREWS])])
    m = score_stage_a_files(gen, tmp_path / "bbu_val.jsonl", records=records).metrics()
    assert m["stage_a/object_recall"] == 1.0 and m["stage_a/irrelevant_accuracy"] == 0.5


def test_reference_resolution(tmp_path: Path) -> None:
    synthetic = tmp_path / "synthetic"
    assert synthetic_reference(synthetic / "val", synthetic) == synthetic / "stage_a_val.jsonl"
    assert resolve_reference("auto", tmp_path / "real", synthetic) is None
    assert resolve_reference(None, synthetic / "val", synthetic) is None
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_reference(str(tmp_path / "nope.jsonl"), synthetic / "val", synthetic)


ComposeAt = Callable[[list[str], Path, Path], object]


def test_stage_a_experiment_scores_itself_against_the_synthetic_references(
    compose_at: ComposeAt, tmp_path: Path, data_dir: Path
) -> None:
    """The embedded run (tiny random model, synthetic test tree) ends with stage_a/* in metrics.json."""
    from hydra.core.hydra_config import HydraConfig

    from bbuqc_lightning.train import train

    cfg = compose_at(
        ["+experiment=stage_a", "logger=none", "data.batch_size=8", "module.max_new_tokens=8"],
        tmp_path / "run",
        data_dir,
    )
    try:
        metrics, _ = train(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert metrics["stage_a/scored_groups"] == metrics["stage_a/groups"] > 0
    assert (
        0.0 <= metrics["stage_a/exact_match"] <= 1.0 and "stage_a/irrelevant_accuracy/bbu_cabling" in metrics
    )
    report = json.loads((Path(cfg.paths.output_dir) / "stage_a_eval.json").read_text(encoding="utf-8"))
    assert report["reference"].endswith("stage_a_test.jsonl") and len(report["worst"]) > 0
    on_disk = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text(encoding="utf-8"))
    assert on_disk["stage_a/object_f1"] == metrics["stage_a/object_f1"]
    # The reference against itself: every synthetic summary parses into objects (nothing left unparsed).
    itself = score_stage_a_files(report["reference"], report["reference"]).metrics()
    assert (
        itself["stage_a/object_f1"]
        == itself["stage_a/exact_match"]
        == itself["stage_a/irrelevant_accuracy"]
        == 1.0
    )
    lines = [s for row in read_summaries(report["reference"]).values() for s in row["per_image"].values()]
    assert not any(parse_summary(s).unparsed for s in lines)
    assert any(parse_summary(s).irrelevant for s in lines) and any(parse_summary(s).remark for s in lines)
