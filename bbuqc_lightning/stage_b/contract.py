"""The Stage-B output contract (SPEC §5): parse a model answer into a :class:`Verdict`.

A valid answer is exactly two lines, after removing one optional leading Qwen3 ``<think>…</think>``
block and the whitespace around the whole text::

    不通过
    理由: 图片_2显示光纤弯曲半径不合理，且无保护措施。

Decisions (each one keeps an ambiguous answer *invalid*, because an invalid answer goes to a person
while a wrongly accepted one could become a false pass):

1. Think block: only a block that *starts* the text is removed; an empty one (``<think>\\n\\n</think>``,
   what Qwen3 writes with thinking disabled) is fine. An unterminated block (``<think>`` with no
   ``</think>``, i.e. the model ran out of tokens while thinking) is invalid (``think_unterminated``).
   A think tag anywhere else simply breaks the two-line shape.
2. Lines are split with :meth:`str.splitlines`, so ``\\r\\n`` is one break and every Unicode line
   separator counts; a blank line in between makes three lines.
3. Line 1 must equal ``通过`` or ``不通过`` with nothing around it — not even spaces (``通过 `` and
   ``通过。`` are invalid). Only the whole text's outer whitespace is forgiven.
4. Line 2 must start with ``理由:`` or ``理由：`` (no leading spaces) and have non-blank reasoning.
5. A summary whose stripped text has at least ``MIN_COPIED_SUMMARY_CHARS`` characters and appears
   verbatim in the reasoning makes the answer invalid; shorter summaries (e.g. ``无关图片``) may be
   quoted. Partial copies are allowed: the SPEC forbids pasting a *whole* summary.

Example::

    >>> parse_verdict("通过\\n理由: 图片_1螺丝齐全且符合要求。")
    Verdict(verdict='pass', reason='图片_1螺丝齐全且符合要求。', valid=True, error=None)
    >>> parse_verdict("通过。\\n理由: 好").error
    "verdict_line: line 1 must be exactly '通过' or '不通过', got '通过。'"
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from bbuqc_lightning.constants import (
    MIN_COPIED_SUMMARY_CHARS,
    REASON_PREFIXES,
    THINK_CLOSE,
    THINK_OPEN,
    VERDICT_FAIL,
    VERDICT_PASS,
    VERDICT_TO_LABEL,
)

_PREVIEW_CHARS = 40


@dataclass(frozen=True)
class Verdict:
    """A parsed answer. ``verdict`` is the label form (``"pass"``/``"fail"``) and is ``None`` unless valid.

    ``reason`` is the reasoning after the ``理由:`` prefix (stripped), also ``None`` unless valid.
    ``error`` is ``"<code>: <message>"`` for an invalid answer, e.g. ``"line_count: expected 2 lines, got 3"``.
    """

    verdict: Literal["pass", "fail"] | None
    reason: str | None
    valid: bool
    error: str | None


def _invalid(code: str, message: str) -> Verdict:
    return Verdict(verdict=None, reason=None, valid=False, error=f"{code}: {message}")


def _preview(text: str) -> str:
    """Short ``repr`` for error messages (answers can be long)."""
    return repr(text if len(text) <= _PREVIEW_CHARS else text[:_PREVIEW_CHARS] + "…")


def strip_think(text: str) -> str | None:
    """Remove one leading ``<think>…</think>`` block; ``None`` when the block is never closed.

    >>> strip_think("<think>\\n\\n</think>\\n\\n通过")
    '\\n\\n通过'
    >>> strip_think("<think>still thinking") is None
    True
    """
    body = text.lstrip()
    if not body.startswith(THINK_OPEN):
        return text
    close = body.find(THINK_CLOSE, len(THINK_OPEN))
    if close < 0:
        return None
    return body[close + len(THINK_CLOSE) :]


def find_copied_summary(reason: str, summaries: Sequence[str] | None) -> str | None:
    """The first summary (stripped, ≥ ``MIN_COPIED_SUMMARY_CHARS`` chars) pasted verbatim in ``reason``.

    >>> find_copied_summary("见BBU设备/华为,显示完整×1", ["BBU设备/华为,显示完整×1"])
    'BBU设备/华为,显示完整×1'
    >>> find_copied_summary("无关图片", ["无关图片"]) is None
    True
    """
    for summary in summaries or ():
        if not isinstance(summary, str):
            continue
        needle = summary.strip()
        if len(needle) >= MIN_COPIED_SUMMARY_CHARS and needle in reason:
            return needle
    return None


def _parse_reason_line(line: str) -> tuple[str | None, Verdict | None]:
    """Return ``(reasoning, None)`` or ``(None, invalid_verdict)`` for line 2."""
    prefix = next((p for p in REASON_PREFIXES if line.startswith(p)), None)
    if prefix is None:
        return None, _invalid(
            "reason_prefix", f"line 2 must start with '理由:' or '理由：', got {_preview(line)}"
        )
    reasoning = line[len(prefix) :].strip()
    if not reasoning:
        return None, _invalid("empty_reason", "line 2 has no reasoning after '理由:'")
    return reasoning, None


def parse_verdict(text: str, summaries: Sequence[str] | None = None) -> Verdict:
    """Parse one model answer against the SPEC §5 contract; never raises.

    ``summaries`` are the group's Stage-A summaries; pass them to enforce the no-copy rule.

    >>> parse_verdict("<think>\\n\\n</think>\\n\\n不通过\\n理由：图片_1螺丝未拧紧。").verdict
    'fail'
    >>> parse_verdict("不通过\\n理由:").error
    "empty_reason: line 2 has no reasoning after '理由:'"
    """
    if not isinstance(text, str):
        return _invalid("not_text", f"expected str, got {type(text).__name__}")
    body = strip_think(text)
    if body is None:
        return _invalid("think_unterminated", "a <think> block is never closed")
    lines = body.strip().splitlines()
    if len(lines) != 2:
        return _invalid("line_count", f"expected 2 lines, got {len(lines)}")
    head, reason_line = lines
    if head not in (VERDICT_PASS, VERDICT_FAIL):
        return _invalid("verdict_line", f"line 1 must be exactly '通过' or '不通过', got {_preview(head)}")
    reasoning, failure = _parse_reason_line(reason_line)
    if failure is not None or reasoning is None:
        return failure or _invalid("empty_reason", "line 2 has no reasoning")
    copied = find_copied_summary(reasoning, summaries)
    if copied is not None:
        return _invalid("copied_summary", f"reason pastes a whole summary verbatim: {_preview(copied)}")
    label: Literal["pass", "fail"] = "pass" if VERDICT_TO_LABEL[head] == "pass" else "fail"
    return Verdict(verdict=label, reason=reasoning, valid=True, error=None)
