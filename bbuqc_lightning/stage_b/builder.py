"""Build Stage-B samples (SPEC §5) from Stage-A JSONL files and mission guidance.

Pipeline: :func:`read_stage_a_jsonl` (parse + validate + normalise legacy ``image_i`` keys) ->
:func:`build_stage_b_samples` (render prompts, enforce ``max_prompt_tokens``). Every bad input is
either a located error (``strict=True``, the default) or a counted, logged skip — never a silent drop.

A sample is a :class:`~bbuqc_lightning.stage_b.sample.StageBSample`::

    StageBSample(messages=[{"role": "system", ...}, {"role": "user", ...}],
                 group_id="QC-TEMP-20250118-0015123", ticket_key="QC-TEMP-20250118-0015123::fail",
                 mission="挡风板安装检查", label="fail", summaries=["…", "…"])

(on disk, ``sample.to_json()`` gives SPEC §5's keys: ``task_type`` for the mission, ``group_label``).

Guidance files (:func:`load_guidance`) are either one mission's guidance
``{"mission": "BBU接地线检查", "version": 3, "experiences": [{"id": "G0", "text": "…"}]}`` or a mapping
``{"<mission>": {"version": 3, "experiences": [...]}, ...}`` of several (the runner's ``guidance.json``
is the first form). Experiences keep file order.

Example::

    >>> records, skipped = read_stage_a_jsonl("stage_a.jsonl")  # doctest: +SKIP
    >>> samples, too_long = build_stage_b_samples(records, templates, load_guidance("guidance.json"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bbuqc_lightning.constants import MISSIONS
from bbuqc_lightning.stage_b.prompts import (
    Guidance,
    StageBTemplates,
    as_templates,
    record_summaries,
    render_stage_b_messages,
)
from bbuqc_lightning.stage_b.sample import StageBSample
from bbuqc_lightning.summaries.records import normalise_stage_a_record

log = logging.getLogger(__name__)


SOURCE = "source_line"  # "<path>:<line>" of a record read from a file, for located errors


class StageBDataError(ValueError):
    """A located problem in Stage-B input (file and line, or ticket key)."""


def read_stage_a_jsonl(path: str | Path, strict: bool = True) -> tuple[list[dict[str, Any]], int]:
    """Read a Stage-A JSONL file; returns ``(records, skipped)``.

    Blank lines are ignored. A malformed line (bad JSON or bad schema), or a second line with a
    ``ticket_key`` seen before (a ticket must not vote twice), raises :class:`StageBDataError` naming
    ``<path>:<line>`` (and the first line) when ``strict``; otherwise it is logged and counted in ``skipped``
    (the first occurrence is kept). Each record remembers its ``<path>:<line>`` under :data:`SOURCE`, so
    later errors (an unknown mission) name the line too.
    """
    path = Path(path)
    records: list[dict[str, Any]] = []
    first_line: dict[str, int] = {}
    skipped = 0
    with path.open("rb") as handle:  # decoded line by line: a line that is not UTF-8 is a located problem
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = normalise_stage_a_record(json.loads(raw.decode("utf-8")))
                problem = ""
            except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
                record, problem = None, f"malformed Stage-A record: {err}"
            if record is not None and record["ticket_key"] in first_line:
                first = first_line[record["ticket_key"]]
                problem = f"duplicate ticket_key {record['ticket_key']!r} (first on line {first})"
            if not problem:
                first_line[record["ticket_key"]] = line_no
                records.append({**record, SOURCE: f"{path}:{line_no}"})
                continue
            message = f"{path}:{line_no}: {problem}"
            if strict:
                raise StageBDataError(message)
            log.warning("skipping %s", message)
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d bad or duplicate line(s), kept %d", path, skipped, len(records))
    return records, skipped


def count_prompt_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    """Prompt length as the model sees it: the chat template with the generation prompt, tokenised.

    Falls back to encoding the concatenated contents when the tokenizer has no chat template.
    """
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
        return len(ids)
    text = "\n".join(m["content"] for m in messages)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_sample(
    record: Mapping[str, Any], templates: StageBTemplates, guidance: Guidance | None
) -> StageBSample:
    """One SPEC §5 sample from a normalised record."""
    return StageBSample(
        messages=render_stage_b_messages(record, templates, guidance),
        group_id=record["group_id"],
        ticket_key=record["ticket_key"],
        mission=record["mission"],
        label=record.get("label"),
        summaries=record_summaries(record),
    )


def _sample_or_error(
    record: Mapping[str, Any],
    templates: StageBTemplates,
    guidance_by_mission: Mapping[str, Guidance] | None,
    tokenizer: Any,
    max_prompt_tokens: int | None,
) -> StageBSample:
    """Build one sample; raises :class:`StageBDataError` naming the ticket key on any problem."""
    key = record.get("ticket_key", "<unknown ticket>")
    where = f"{record[SOURCE]}: {key}" if SOURCE in record else key
    mission = record.get("mission")
    if mission not in templates.mission_focus:
        raise StageBDataError(
            f"{where}: unknown mission {mission!r}; known: {sorted(templates.mission_focus)}"
        )
    sample = build_sample(record, templates, (guidance_by_mission or {}).get(mission))
    if max_prompt_tokens is not None:
        n_tokens = count_prompt_tokens(tokenizer, sample.messages)
        if n_tokens > max_prompt_tokens:
            raise StageBDataError(
                f"{where}: prompt has {n_tokens} tokens > max_prompt_tokens={max_prompt_tokens}"
            )
    return sample


def build_stage_b_samples(
    records: Iterable[Mapping[str, Any]],
    templates: StageBTemplates | Mapping[str, Any],
    guidance_by_mission: Mapping[str, Guidance] | None,
    tokenizer: Any = None,
    max_prompt_tokens: int | None = None,
    strict: bool = True,
) -> tuple[list[StageBSample], int]:
    """Stage-B samples for normalised Stage-A records; returns ``(samples, skipped)``.

    A record of an unknown mission or with a prompt over ``max_prompt_tokens`` raises
    :class:`StageBDataError` naming its ticket key (``strict``) or is logged and counted as skipped.
    """
    if max_prompt_tokens is not None and tokenizer is None:
        raise ValueError("max_prompt_tokens needs a tokenizer to count prompt tokens")
    tpl = as_templates(templates)
    samples: list[StageBSample] = []
    skipped = 0
    for record in records:
        try:
            samples.append(_sample_or_error(record, tpl, guidance_by_mission, tokenizer, max_prompt_tokens))
        except StageBDataError as err:
            if strict:
                raise
            log.warning("skipping Stage-B sample: %s", err)
            skipped += 1
    if skipped:
        log.warning("Stage-B builder skipped %d record(s), built %d", skipped, len(samples))
    return samples, skipped


def _experience_texts(block: Any, where: str) -> list[str]:
    """Texts of one mission's ``experiences`` list (items ``{"id", "text"}`` or plain strings)."""
    experiences = block.get("experiences") if isinstance(block, Mapping) else None
    if not isinstance(experiences, list):
        raise ValueError(f"{where}: expected an object with an 'experiences' list")
    texts: list[str] = []
    for i, item in enumerate(experiences):
        text = item.get("text") if isinstance(item, Mapping) else item
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: experience #{i} has no text: {item!r}")
        texts.append(text.strip())
    return texts


def load_guidance(path: str | Path) -> dict[str, list[str]]:
    """Read a guidance JSON file into ``{mission: [experience text, ...]}`` (see module docstring)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: guidance must be a JSON object")
    if "experiences" in data:
        mission = data.get("mission")
        if not isinstance(mission, str) or mission not in MISSIONS:
            raise ValueError(
                f"{path}: single-mission guidance needs 'mission', one of {list(MISSIONS)}; got {mission!r}"
            )
        return {mission: _experience_texts(data, str(path))}
    guidance: dict[str, list[str]] = {}
    for mission, block in data.items():
        inner = block.get("mission", mission) if isinstance(block, Mapping) else mission
        if inner != mission:
            raise ValueError(f"{path}: entry {mission!r} declares mission {inner!r}")
        guidance[mission] = _experience_texts(block, f"{path} [{mission}]")
    unknown = sorted(set(guidance) - set(MISSIONS))
    if unknown:  # its experiences would never reach a prompt
        raise ValueError(
            f"{path}: unknown mission(s) {unknown} (known: {list(MISSIONS)}; a single-mission file is "
            '{"mission": ..., "experiences": [...]})'
        )
    return guidance


def load_stage_b_records(
    paths: Sequence[str | Path], strict: bool = True
) -> tuple[list[dict[str, Any]], int]:
    """Read several Stage-A files (e.g. one per mission) into one list; returns ``(records, skipped)``.

    A ``ticket_key`` already read from an earlier file is an error naming both lines (``strict``) or a
    logged, counted skip, as within one file.
    """
    records: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    skipped = 0
    for path in paths:
        part, n_skipped = read_stage_a_jsonl(path, strict=strict)
        skipped += n_skipped
        for record in part:
            key = record["ticket_key"]
            if key in seen:
                message = f"{record[SOURCE]}: duplicate ticket_key {key!r} (first at {seen[key]})"
                if strict:
                    raise StageBDataError(message)
                log.warning("skipping %s", message)
                skipped += 1
                continue
            seen[key] = record[SOURCE]
            records.append(record)
    return records, skipped
