"""K sampled answers per group under the current guidance, through the one generation engine.

The Stage-B DataModule renders prompts once, with the guidance of ``data.guidance_path``; the runner's
guidance changes every epoch, so each sample's messages are re-rendered here from its summaries with
:func:`~bbuqc_lightning.stage_b.prompts.render_stage_b_messages` (the same builder, the same templates).

Example::

    results = rollout_groups(engine, samples, messages, SamplingParams(do_sample=True, num_return_sequences=4),
                             versions=[0] * len(samples), epoch=0)
    results[0].selection.verdict
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bbuqc_lightning.constants import image_key
from bbuqc_lightning.generation.protocol import Engine, naming_prompts
from bbuqc_lightning.generation.sampling import SamplingParams
from bbuqc_lightning.stage_b.prompts import StageBTemplates, render_stage_b_messages
from bbuqc_lightning.stage_b.sample import StageBSample
from bbuqc_lightning.stage_b_runner.guidance import MissionGuidance
from bbuqc_lightning.stage_b_runner.selection import Candidate, GroupResult, select_candidate


def render_messages(
    sample: StageBSample, templates: StageBTemplates, guidance: MissionGuidance
) -> list[dict[str, str]]:
    """System + user messages of one Stage-B sample under ``guidance``."""
    per_image = {image_key(i): s for i, s in enumerate(sample.summaries, start=1)}
    record = {"mission": sample.mission, "per_image": per_image}
    return render_stage_b_messages(record, templates, guidance.as_prompt())


def rollout_groups(
    engine: Engine,
    samples: Sequence[StageBSample],
    messages: Sequence[list[dict[str, str]]],
    params: SamplingParams,
    versions: Sequence[int],
    epoch: int,
) -> list[GroupResult]:
    """Generate ``params.num_return_sequences`` answers per sample, parse them, select one per group."""
    with naming_prompts([s.ticket_key for s in samples]):
        outputs = engine.generate(list(messages), params)
    if len(outputs) != len(samples):
        raise RuntimeError(f"engine returned {len(outputs)} groups of completions for {len(samples)} prompts")
    results = []
    for sample, msgs, version, completions in zip(samples, messages, versions, outputs, strict=True):
        candidates = [
            Candidate.parse(i, c.text, sample.summaries, c.truncated) for i, c in enumerate(completions)
        ]
        results.append(GroupResult(sample, msgs, version, epoch, candidates, select_candidate(candidates)))
    return results


def trajectory_rows(group: GroupResult, phase: str) -> list[dict[str, Any]]:
    """One ``trajectories.jsonl`` row per rollout."""
    return [
        {
            "epoch": group.epoch,
            "phase": phase,
            "mission": group.mission,
            "ticket_key": group.ticket_key,
            "group_id": group.sample.group_id,
            "guidance_version": group.guidance_version,
            "rollout_index": c.index,
            "raw_text": c.text,
            "verdict": c.verdict,
            "valid": c.valid,
            "error": c.error,
            "truncated": c.truncated,
        }
        for c in group.candidates
    ]


def selection_row(group: GroupResult, phase: str) -> dict[str, Any]:
    """One ``selections.jsonl`` row: the selected answer with its vote and how it relates to the label."""
    s = group.selection
    return {
        "epoch": group.epoch,
        "phase": phase,
        "mission": group.mission,
        "ticket_key": group.ticket_key,
        "group_id": group.sample.group_id,
        "label": group.label,
        "guidance_version": group.guidance_version,
        "verdict": s.verdict,
        "valid": s.verdict is not None,
        "selected_index": s.index,
        "vote_strength": s.vote_strength,
        "votes": s.votes,
        "label_match": group.label_match,
        "conflict_flag": group.conflict_flag,
        "disagreement": s.disagreement,
        "answer": group.selected.answer if group.selected else None,
    }
