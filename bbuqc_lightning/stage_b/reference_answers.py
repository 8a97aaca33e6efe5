"""Rule-derived reference answers for synthetic Stage-B tickets (SPEC §5 two-line verdicts).

The synthetic data set labels each ticket by the SPEC §2 rules (:func:`~bbuqc_lightning.data.synthetic.scenes.explain_group`);
these functions write the answer a careful reviewer would give, in the product's contract, for the fusion SFT
demo's Stage-B file (:mod:`bbuqc_lightning.fusion_sft.synthetic_sources`) and the tiny demo Teacher
(:mod:`bbuqc_lightning.stage_b_runner.tiny_teacher`). Every Chinese phrase comes from the config
(``prompts.synthetic``: ``reasons``, ``reason_template``, ``reason_separator``).

Example::

    rows = stage_b_rows(records, cfg.prompts.stage_b, cfg.prompts.synthetic)   # chatml rows with the answer
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bbuqc_lightning.constants import LABEL_TO_VERDICT, REASON_PREFIXES
from bbuqc_lightning.data.synthetic.scenes import explain_group
from bbuqc_lightning.stage_b.builder import build_stage_b_samples
from bbuqc_lightning.stage_b.contract import parse_verdict


def verdict_answer(mission: str, label: str, summaries: Sequence[str], texts: Mapping[str, Any]) -> str:
    """The two-line Stage-B answer for a rule-labelled group; raises if it breaks the SPEC §5 contract."""
    codes = explain_group(mission, summaries)
    if (label == "fail") != bool(codes):
        raise ValueError(f"label {label!r} disagrees with the rules ({codes}) for a {mission} group")
    reasons = texts["reasons"]
    phrases = [_reason_phrase(code, reasons) for code in dict.fromkeys(codes)] or [reasons["pass"]]
    reason = texts["reason_template"].format(reasons=texts["reason_separator"].join(phrases))
    answer = f"{LABEL_TO_VERDICT[label]}\n{REASON_PREFIXES[0]} {reason}"
    verdict = parse_verdict(answer, summaries)
    if not verdict.valid or verdict.verdict != label:
        raise ValueError(f"generated answer breaks the Stage-B contract ({verdict.error}): {answer!r}")
    return answer


def _reason_phrase(code: str, reasons: Mapping[str, str]) -> str:
    kind, _, what = code.partition(":")
    if kind not in reasons:
        raise KeyError(
            f"no reason text for rule code {kind!r}; add it to data.synthetic_sources.texts.reasons"
        )
    return reasons[kind].format(what=what)


def stage_b_rows(
    records: Sequence[Mapping[str, Any]], stage_b_templates: Mapping[str, Any], texts: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Distillation-shaped chatml rows: the Stage-B prompt and the rule-derived verdict."""
    samples, _ = build_stage_b_samples(records, stage_b_templates, None)
    rows = []
    for sample in samples:
        answer = verdict_answer(sample.mission, sample.label, sample.summaries, texts)
        rows.append(
            {
                "messages": [*sample.messages, {"role": "assistant", "content": answer}],
                "ticket_key": sample.ticket_key,
                "group_id": sample.group_id,
                "mission": sample.mission,
                "label": sample.label,
            }
        )
    return rows
