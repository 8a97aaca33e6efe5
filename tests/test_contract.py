"""The Stage-B two-line output contract (SPEC §5): a table of cases plus property tests."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bbuqc_lightning.constants import MIN_COPIED_SUMMARY_CHARS, VERDICT_FAIL, VERDICT_PASS
from bbuqc_lightning.stage_b.contract import Verdict, parse_verdict

SUMMARY_12 = "光纤/无保护措施,弯曲半"  # exactly 12 characters
assert len(SUMMARY_12) == MIN_COPIED_SUMMARY_CHARS

VALID_CASES = [
    ("通过\n理由: 图片_1螺丝齐全且符合要求。", "pass", "图片_1螺丝齐全且符合要求。"),
    (
        "不通过\n理由: 图片_2显示光纤弯曲半径不合理，且无保护措施。",
        "fail",
        "图片_2显示光纤弯曲半径不合理，且无保护措施。",
    ),
    ("不通过\n理由：全角冒号也可以。", "fail", "全角冒号也可以。"),
    ("  \n通过\n理由: 外侧空白被去掉。 \n\n", "pass", "外侧空白被去掉。"),
    ("<think>\n\n</think>\n\n不通过\n理由: 空思考块。", "fail", "空思考块。"),
    ("<think>先看图片_1，再看图片_2。</think>\n通过\n理由: 有思考块。", "pass", "有思考块。"),
    ("通过\r\n理由: Windows 换行。", "pass", "Windows 换行。"),
    ("通过\n理由:   前后空格不算理由   ", "pass", "前后空格不算理由"),
]

INVALID_CASES = [
    ("", "line_count"),
    ("   \n  ", "line_count"),
    ("通过", "line_count"),
    ("通过\n理由: 第二行\n多余的第三行", "line_count"),
    ("通过\n\n理由: 中间空行。", "line_count"),
    ("通过。\n理由: 句号不行。", "verdict_line"),
    ("通过 \n理由: 第一行尾随空格不行。", "verdict_line"),
    ("通过，\n理由: 逗号不行。", "verdict_line"),
    ("Pass\n理由: 英文不行。", "verdict_line"),
    ("结论：通过\n理由: 多余前缀不行。", "verdict_line"),
    ("通过\n原因: 前缀错误。", "reason_prefix"),
    ("通过\n 理由: 行首空格。", "reason_prefix"),
    ("通过\n理由:", "empty_reason"),
    ("通过\n理由：   ", "empty_reason"),
    ("<think>想了很久还没想完", "think_unterminated"),
    ("通过\n理由: 正常</think>", None),  # valid: a stray tag inside the reason is just text
]


@pytest.mark.parametrize(("text", "verdict", "reason"), VALID_CASES)
def test_valid_answers(text: str, verdict: str, reason: str) -> None:
    assert parse_verdict(text) == Verdict(verdict=verdict, reason=reason, valid=True, error=None)


@pytest.mark.parametrize(("text", "code"), [c for c in INVALID_CASES if c[1] is not None])
def test_invalid_answers(text: str, code: str) -> None:
    result = parse_verdict(text)
    assert not result.valid
    assert result.verdict is None and result.reason is None
    assert result.error is not None and result.error.startswith(f"{code}: ")


def test_line_count_error_is_machine_readable() -> None:
    assert parse_verdict("通过\n理由: a\nb").error == "line_count: expected 2 lines, got 3"


def test_think_block_later_in_text_is_not_stripped() -> None:
    assert not parse_verdict("通过\n<think>x</think>\n理由: y").valid


def test_copied_summary_of_min_length_is_invalid() -> None:
    result = parse_verdict(f"不通过\n理由: 图片_1写着{SUMMARY_12}。", [SUMMARY_12])
    assert not result.valid and result.error is not None and result.error.startswith("copied_summary: ")


def test_copied_summary_one_char_shorter_is_allowed() -> None:
    short = SUMMARY_12[:-1]
    result = parse_verdict(f"不通过\n理由: 图片_1写着{short}。", [short])
    assert result.valid and result.verdict == "fail"


def test_partial_copy_of_long_summary_is_allowed() -> None:
    summary = SUMMARY_12 + "合理/蛇形管×2"
    assert parse_verdict(f"不通过\n理由: {SUMMARY_12}。", [summary]).valid
    assert not parse_verdict(f"不通过\n理由: {summary}。", [summary]).valid


def test_summary_whitespace_is_ignored_when_matching_copies() -> None:
    assert not parse_verdict(f"通过\n理由: {SUMMARY_12}", [f"  {SUMMARY_12}\t"]).valid


def test_non_string_input_is_invalid_not_an_exception() -> None:
    assert parse_verdict(None).error == "not_text: expected str, got NoneType"  # type: ignore[arg-type]


# Arbitrary text rarely hits the contract's tokens, so also build texts from them.
FRAGMENTS = [
    "<think>",
    "</think>",
    VERDICT_PASS,
    VERDICT_FAIL,
    "理由:",
    "理由：",
    "\n",
    "\r\n",
    " ",
    "图片_1",
    "。",
]
contract_like = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5)), max_size=12).map("".join)


@given(st.one_of(st.text(), contract_like), st.one_of(st.none(), st.lists(st.text(max_size=30), max_size=4)))
def test_never_raises_and_invalid_has_no_verdict(text: str, summaries: list[str] | None) -> None:
    result = parse_verdict(text, summaries)
    assert result.valid == (result.error is None)
    if not result.valid:
        assert result.verdict is None and result.reason is None
    else:
        assert result.verdict in ("pass", "fail") and result.reason


@given(st.one_of(st.text(), contract_like), st.one_of(st.text(), contract_like))
def test_only_exact_first_line_can_pass(line1: str, rest: str) -> None:
    result = parse_verdict(f"{line1}\n理由: {rest}")
    first_line = parse_first_line(f"{line1}\n理由: {rest}")
    if result.verdict == "pass":
        assert first_line == VERDICT_PASS
    if first_line not in (VERDICT_PASS, VERDICT_FAIL):
        assert result.verdict is None


def _one_line(text: str) -> bool:
    return bool(text.strip()) and len(text.splitlines()) == 1


@given(st.sampled_from([VERDICT_PASS, VERDICT_FAIL]), st.text(min_size=1).filter(_one_line))
def test_well_formed_answers_are_valid(head: str, reason: str) -> None:
    result = parse_verdict(f"{head}\n理由: {reason}")
    assert result.valid, result.error
    assert result.verdict == ("pass" if head == VERDICT_PASS else "fail")


def parse_first_line(text: str) -> str:
    """First line after the contract's own stripping (think block + outer whitespace)."""
    from bbuqc_lightning.stage_b.contract import strip_think

    body = strip_think(text)
    lines = (body or "").strip().splitlines()
    return lines[0] if lines else ""
