"""Stage-B sample builder (SPEC §5): schema, legacy keys, located errors, skips, guidance, prompt length."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from bbuqc_lightning.stage_b.builder import (
    StageBDataError,
    build_stage_b_samples,
    load_guidance,
    read_stage_a_jsonl,
)
from bbuqc_lightning.stage_b.prompts import StageBTemplates, load_stage_b_templates

CONF_PROMPTS = Path(__file__).resolve().parents[1] / "conf" / "prompts" / "stage_b.yaml"
MISSION = "挡风板安装检查"
S1 = "BBU设备/华为,显示完整,机柜空间充足需要安装/这个BBU设备未按要求配备挡风板×1，标签/可以识别×2"
S2 = "无关图片"


def _record(group_id: str = "QC-TEMP-20250118-0015123", label: str | None = "fail", **extra: Any) -> dict:
    record = {
        "group_id": group_id,
        "ticket_key": f"{group_id}::{label if label else 'unlabeled'}",
        "mission": MISSION,
        "label": label,
        "images": ["IMG_01.jpg", "IMG_02.jpg"],
        "per_image": {"图片_1": S1, "图片_2": S2},
    }
    record.update(extra)
    return record


def _write(path: Path, lines: list[Any]) -> Path:
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n"
    )
    return path


@pytest.fixture(scope="module")
def templates() -> StageBTemplates:
    return load_stage_b_templates(CONF_PROMPTS)


def test_config_templates_cover_every_mission(templates: StageBTemplates) -> None:
    from bbuqc_lightning.constants import MISSIONS

    assert set(templates.mission_focus) == set(MISSIONS)
    assert "通过" in templates.system and "理由" in templates.system


def test_sample_schema(tmp_path: Path, templates: StageBTemplates) -> None:
    records, skipped = read_stage_a_jsonl(
        _write(tmp_path / "a.jsonl", [_record(), _record("QC-X-20250101-1", "pass")])
    )
    samples, n_skipped = build_stage_b_samples(records, templates, None)
    assert (skipped, n_skipped, len(samples)) == (0, 0, 2)
    sample = samples[0]
    assert set(sample.to_json()) == {
        "messages",
        "group_id",
        "ticket_key",
        "task_type",
        "group_label",
        "summaries",
    }
    assert [m["role"] for m in sample.messages] == ["system", "user"]
    assert sample.ticket_key == "QC-TEMP-20250118-0015123::fail"
    assert (sample.mission, sample.label, sample.summaries) == (MISSION, "fail", [S1, S2])
    user = sample.messages[1]["content"]
    assert f"图片_1: {S1}" in user and f"图片_2: {S2}" in user and MISSION in user
    assert templates.no_guidance in user


def test_legacy_image_keys_are_renumbered_in_numeric_order(tmp_path: Path) -> None:
    per_image = {f"image_{i}": f"摘要{i}" for i in (10, 2, 1, 3, 4, 5, 6, 7, 8, 9)}
    legacy = _record(per_image=per_image, images=None)
    del legacy["ticket_key"]  # earlier pipeline files have none; it is derived
    records, _ = read_stage_a_jsonl(_write(tmp_path / "legacy.jsonl", [legacy]))
    assert list(records[0]["per_image"]) == [f"图片_{i}" for i in range(1, 11)]
    assert records[0]["per_image"]["图片_10"] == "摘要10"
    assert records[0]["ticket_key"] == "QC-TEMP-20250118-0015123::fail"


@pytest.mark.parametrize(
    ("per_image", "message"),
    [
        ({"图片_1": S1, "图片_3": S2}, "exactly 1..2"),
        ({"图片_1": S1, "image_2": S2}, "mixes"),
        ({"图片_1": S1, "图片_2": "两行\n摘要"}, "one non-empty line"),
        ({"图片_1": S1, "图片_2": "  "}, "one non-empty line"),
        ({"photo_1": S1}, "unexpected per_image key"),
        ({}, "non-empty mapping"),
    ],
)
def test_bad_per_image_is_a_located_error(tmp_path: Path, per_image: dict, message: str) -> None:
    path = _write(tmp_path / "bad.jsonl", [_record(), _record(per_image=per_image, images=None)])
    with pytest.raises(StageBDataError, match=message) as err:
        read_stage_a_jsonl(path)
    assert f"{path}:2:" in str(err.value) and "QC-TEMP-20250118-0015123" in str(err.value)


def test_malformed_json_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "broken.jsonl", [_record(), "", '{"group_id": "QC-', _record()])
    with pytest.raises(StageBDataError) as err:
        read_stage_a_jsonl(path)
    assert str(err.value).startswith(f"{path}:3: malformed Stage-A record")


def test_non_strict_skips_are_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = [
        _record(),
        "not json",
        _record(label="maybe"),
        _record(images=["one.jpg"]),
        _record("QC-A-20250101-2"),
    ]
    with caplog.at_level(logging.WARNING):
        records, skipped = read_stage_a_jsonl(_write(tmp_path / "mixed.jsonl", lines), strict=False)
    assert (len(records), skipped) == (2, 3)
    assert "mixed.jsonl:2" in caplog.text and "skipped 3" in caplog.text


def test_inconsistent_ticket_key_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(StageBDataError, match="ticket_key"):
        read_stage_a_jsonl(
            _write(tmp_path / "t.jsonl", [_record(ticket_key="QC-TEMP-20250118-0015123::pass")])
        )


def test_guidance_is_injected_into_the_user_message(tmp_path: Path, templates: StageBTemplates) -> None:
    guidance_file = tmp_path / "guidance.json"
    guidance_file.write_text(
        json.dumps(
            {
                "mission": MISSION,
                "version": 2,
                "experiences": [
                    {"id": "G0", "text": "需要安装却未配备挡风板必须不通过"},
                    {"id": "G1", "text": "方向错误不通过"},
                ],
            },
            ensure_ascii=False,
        )
    )
    guidance = load_guidance(guidance_file)
    assert guidance == {MISSION: ["需要安装却未配备挡风板必须不通过", "方向错误不通过"]}
    samples, _ = build_stage_b_samples([_normalised()], templates, guidance)
    user = samples[0].messages[1]["content"]
    assert "G0. 需要安装却未配备挡风板必须不通过\nG1. 方向错误不通过" in user
    assert templates.no_guidance not in user


def test_multi_mission_guidance_file(tmp_path: Path) -> None:
    path = tmp_path / "all.json"
    path.write_text(
        json.dumps(
            {
                MISSION: {"version": 1, "experiences": [{"id": "G0", "text": "a"}]},
                "BBU接地线检查": {"mission": "BBU接地线检查", "version": 4, "experiences": []},
            },
            ensure_ascii=False,
        )
    )
    assert load_guidance(path) == {MISSION: ["a"], "BBU接地线检查": []}
    path.write_text(
        json.dumps({MISSION: {"mission": "BBU接地线检查", "experiences": []}}, ensure_ascii=False)
    )
    with pytest.raises(ValueError, match="declares mission"):
        load_guidance(path)
    # a misspelt mission would never reach a prompt; a broken file names itself
    path.write_text(json.dumps({"BBU接地线检察": {"experiences": []}}, ensure_ascii=False))
    with pytest.raises(ValueError, match=r"all.json: unknown mission\(s\) \['BBU接地线检察'\]"):
        load_guidance(path)
    path.write_text(json.dumps({"mission": "BBU接地线检察", "experiences": []}, ensure_ascii=False))
    with pytest.raises(ValueError, match=r"all\.json: single-mission guidance needs 'mission', one of"):
        load_guidance(path)
    path.write_text('{"mission": "BBU接地线检查", "experiences": [],}')
    with pytest.raises(ValueError, match=r"all\.json: not valid JSON"):
        load_guidance(path)


def _normalised(**extra: Any) -> dict:
    from bbuqc_lightning.summaries.records import normalise_stage_a_record

    return normalise_stage_a_record(_record(**extra))


def test_unknown_mission_strict_and_non_strict(templates: StageBTemplates) -> None:
    odd = _normalised(mission="其他任务")
    with pytest.raises(StageBDataError, match=r"QC-TEMP-20250118-0015123::fail: unknown mission"):
        build_stage_b_samples([odd], templates, None)
    assert build_stage_b_samples([odd, _normalised()], templates, None, strict=False)[1] == 1


def test_max_prompt_tokens_names_the_ticket(templates: StageBTemplates) -> None:
    from bbuqc_lightning.models.factory import build_tokenizer

    tokenizer = build_tokenizer()
    record = _normalised()
    samples, _ = build_stage_b_samples([record], templates, None, tokenizer=tokenizer, max_prompt_tokens=4096)
    assert len(samples) == 1
    with pytest.raises(StageBDataError, match=r"QC-TEMP-20250118-0015123::fail: prompt has \d+ tokens > "):
        build_stage_b_samples([record], templates, None, tokenizer=tokenizer, max_prompt_tokens=16)
    samples, skipped = build_stage_b_samples(
        [record], templates, None, tokenizer=tokenizer, max_prompt_tokens=16, strict=False
    )
    assert (samples, skipped) == ([], 1)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_stage_b_samples([record], templates, None, max_prompt_tokens=16)


def test_templates_accept_a_plain_mapping_and_reject_unknown_fields() -> None:
    mapping = {
        "system": "S",
        "user": "{mission}:{summaries}",
        "mission_focus": {MISSION: "F"},
        "no_guidance": "无",
    }
    samples, _ = build_stage_b_samples([_normalised()], mapping, None)
    assert samples[0].messages[1]["content"] == f"{MISSION}:图片_1: {S1}\n图片_2: {S2}"
    with pytest.raises(ValueError, match="unknown user fields"):
        StageBTemplates.from_mapping({**mapping, "user": "{mision}"})
    with pytest.raises(ValueError, match="missing key 'no_guidance'"):
        StageBTemplates.from_mapping({k: v for k, v in mapping.items() if k != "no_guidance"})


def test_duplicate_ticket_key_names_both_lines_or_is_a_counted_skip(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(tmp_path / "dup.jsonl", [_record(), _record("QC-A-20250101-2"), _record()])
    with pytest.raises(StageBDataError) as err:
        read_stage_a_jsonl(path)
    assert str(err.value) == (
        f"{path}:3: duplicate ticket_key 'QC-TEMP-20250118-0015123::fail' (first on line 1)"
    )
    with caplog.at_level(logging.WARNING):
        records, skipped = read_stage_a_jsonl(path, strict=False)
    assert ([r["group_id"] for r in records], skipped) == (["QC-TEMP-20250118-0015123", "QC-A-20250101-2"], 1)
    assert "dup.jsonl:3: duplicate ticket_key" in caplog.text


def test_duplicate_ticket_key_across_files_names_both(tmp_path: Path) -> None:
    from bbuqc_lightning.stage_b.builder import load_stage_b_records

    first, second = _write(tmp_path / "a.jsonl", [_record()]), _write(tmp_path / "b.jsonl", [_record()])
    with pytest.raises(StageBDataError, match=rf"{second}:1: duplicate ticket_key .* \(first at {first}:1\)"):
        load_stage_b_records([first, second])
    assert load_stage_b_records([first, second], strict=False)[1] == 1


def test_unknown_mission_read_from_a_file_names_file_and_line(
    tmp_path: Path, templates: StageBTemplates
) -> None:
    path = _write(tmp_path / "odd.jsonl", [_record("QC-A-20250101-2"), _record(mission="其他任务")])
    records, _ = read_stage_a_jsonl(path)
    with pytest.raises(StageBDataError, match=rf"^{path}:2: QC-TEMP-20250118-0015123::fail: unknown mission"):
        build_stage_b_samples(records, templates, None)


def test_a_line_that_is_not_utf8_is_located_or_skipped(tmp_path: Path) -> None:
    path = _write(tmp_path / "mixed.jsonl", [_record(), _record("QC-A-20250101-2")])
    path.write_bytes(path.read_bytes() + b'{"group_id": "QC-\xc3\x28"}\n')
    with pytest.raises(StageBDataError, match=rf"^{path}:3: malformed Stage-A record: 'utf-8' codec"):
        read_stage_a_jsonl(path)
    assert read_stage_a_jsonl(path, strict=False)[1] == 1
