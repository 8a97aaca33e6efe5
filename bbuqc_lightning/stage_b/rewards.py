"""Stage-B rewards (SPEC §5) as plain functions with TRL's ``reward_funcs`` calling convention.

Each function takes ``completions`` (one per rollout) plus dataset columns as keyword lists and
returns one float per completion. They are *unweighted*: weights (label 1.0, format 0.2, false-pass
penalty off) live in config and are applied by the trainer (``GRPOConfig.reward_weights`` in TRL, or
our own GRPO loop), so the same function means the same thing everywhere.

Completions may be plain strings or TRL's conversational form (a list of message dicts; the last
assistant message is scored). An optional ``summaries`` column (one list per completion) enables the
no-copy rule of the contract. Extra keywords TRL sends (``prompts``, ``completion_ids``,
``trainer_state``, ``log_metric``…) are ignored. The column names are SPEC §5's keys, which
:meth:`~bbuqc_lightning.stage_b.sample.StageBSample.reward_columns` gives for a sample.

Which rewards a run uses is the name -> function table ``module.reward_funcs`` of ``conf/module/grpo.yaml``:
each entry names a function by its dotted import path (``_target_``, ``_partial_: true``), so a reward of
your own is one more entry (``+module.reward_funcs.length._target_=my_pkg.rewards.length_reward``).

Example::

    >>> label_reward(["通过\\n理由: 齐全。", "通过\\n理由: 齐全。"], group_label=["pass", "fail"])
    [1.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from bbuqc_lightning.constants import VERDICT_TO_LABEL
from bbuqc_lightning.stage_b.contract import Verdict, parse_verdict

RewardFunc = Callable[..., list[float]]  # f(completions, **columns) -> one float per completion


def completion_text(completion: Any) -> str:
    """The text to score: a string as is, or the last assistant message of a conversation.

    >>> completion_text([{"role": "assistant", "content": [{"type": "text", "text": "通过"}]}])
    '通过'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, Sequence):
        messages = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role") == "assistant"] or messages
        return _content_text(assistant[-1].get("content")) if assistant else ""
    return ""


def _content_text(content: Any) -> str:
    """Message content as text: a string, or the concatenated ``text`` parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _normalise_label(label: Any) -> str | None:
    """``"pass"``/``"fail"`` (also accepts ``通过``/``不通过``); anything else -> ``None``."""
    if label in ("pass", "fail"):
        return label
    return VERDICT_TO_LABEL.get(label) if isinstance(label, str) else None


def _parse_all(completions: Sequence[Any], summaries: Sequence[Sequence[str] | None] | None) -> list[Verdict]:
    if summaries is not None and len(summaries) != len(completions):
        raise ValueError(f"got {len(summaries)} summary lists for {len(completions)} completions")
    per_item = summaries if summaries is not None else [None] * len(completions)
    return [parse_verdict(completion_text(c), s) for c, s in zip(completions, per_item, strict=True)]


def _check_labels(completions: Sequence[Any], group_label: Sequence[Any]) -> None:
    if len(group_label) != len(completions):
        raise ValueError(f"got {len(group_label)} labels for {len(completions)} completions")


def label_reward(completions: Sequence[Any], group_label: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 when the parsed verdict equals the group label, else 0.0 (invalid or unlabelled -> 0.0)."""
    _check_labels(completions, group_label)
    verdicts = _parse_all(completions, kwargs.get("summaries"))
    return [
        1.0 if v.valid and v.verdict == _normalise_label(lab) else 0.0
        for v, lab in zip(verdicts, group_label, strict=True)
    ]


def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 when the answer meets the two-line contract (including the no-copy rule), else 0.0."""
    return [1.0 if v.valid else 0.0 for v in _parse_all(completions, kwargs.get("summaries"))]


def false_pass_penalty(completions: Sequence[Any], group_label: Sequence[Any], **kwargs: Any) -> list[float]:
    """-1.0 for a valid 通过 on a group labelled fail (误放行), else 0.0. Off unless its weight is set."""
    _check_labels(completions, group_label)
    verdicts = _parse_all(completions, kwargs.get("summaries"))
    return [
        -1.0 if v.valid and v.verdict == "pass" and _normalise_label(lab) == "fail" else 0.0
        for v, lab in zip(verdicts, group_label, strict=True)
    ]
