"""Render Stage-B chat messages from config templates (the Chinese wording lives in ``conf/prompts/stage_b.yaml``).

The templates are a mapping with four keys:

- ``system``: the system prompt (task + the exact two-line output contract);
- ``user``: a :meth:`str.format` template; fields ``{mission}``, ``{mission_focus}``, ``{guidance}``,
  ``{summaries}``, ``{num_images}`` (any subset; unknown fields are rejected when loading);
- ``mission_focus``: mission name -> what that mission checks;
- ``no_guidance``: the text put in ``{guidance}`` when a mission has no experiences yet.

Guidance renders as numbered lines ``G0. …``; summaries as ``图片_1: …`` lines in image order.

Example::

    >>> t = StageBTemplates(system="S", user="{mission}|{guidance}|{summaries}|{num_images}",
    ...                     mission_focus={"BBU接地线检查": "F"}, no_guidance="无")
    >>> rec = {"mission": "BBU接地线检查", "per_image": {"图片_1": "电线/捆扎整齐×1"}}
    >>> render_stage_b_messages(rec, t, ["接地螺丝必须符合要求"])[1]["content"]
    'BBU接地线检查|G0. 接地螺丝必须符合要求|图片_1: 电线/捆扎整齐×1|1'
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bbuqc_lightning.constants import image_key

USER_FIELDS: frozenset[str] = frozenset({"mission", "mission_focus", "guidance", "summaries", "num_images"})
_REQUIRED_KEYS = ("system", "user", "mission_focus", "no_guidance")

Guidance = Sequence[str] | Mapping[str, str]


@dataclass(frozen=True)
class StageBTemplates:
    """The four prompt pieces; build with :meth:`from_mapping` to validate a config block."""

    system: str
    user: str
    mission_focus: Mapping[str, str]
    no_guidance: str

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> StageBTemplates:
        """Validate a loaded YAML/Hydra mapping, reporting every problem at once."""
        problems = [f"missing key {key!r}" for key in _REQUIRED_KEYS if key not in mapping]
        if problems:
            raise ValueError("Stage-B prompt templates: " + "; ".join(problems))
        focus = mapping["mission_focus"]
        if not isinstance(focus, Mapping):
            raise ValueError("Stage-B prompt templates: 'mission_focus' must be a mapping mission -> text")
        unknown = sorted(_format_fields(str(mapping["user"])) - USER_FIELDS)
        if unknown:
            raise ValueError(
                f"Stage-B prompt templates: unknown user fields {unknown}; allowed {sorted(USER_FIELDS)}"
            )
        return cls(
            system=str(mapping["system"]).strip(),
            user=str(mapping["user"]).strip(),
            mission_focus={str(k): str(v).strip() for k, v in focus.items()},
            no_guidance=str(mapping["no_guidance"]).strip(),
        )


def _format_fields(template: str) -> set[str]:
    """Field names used by a ``str.format`` template (``"{a}{b!r}"`` -> ``{"a", "b"}``)."""
    try:
        return {field for _, field, _, _ in string.Formatter().parse(template) if field}
    except ValueError as err:
        raise ValueError(f"Stage-B user template is not a valid format string: {err}") from err


def load_stage_b_templates(path: str | Path) -> StageBTemplates:
    """Read ``conf/prompts/stage_b.yaml`` (or any file of the same shape)."""
    with Path(path).open(encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a YAML mapping with keys {list(_REQUIRED_KEYS)}")
    return StageBTemplates.from_mapping(data)


def as_templates(templates: StageBTemplates | Mapping[str, Any]) -> StageBTemplates:
    """Accept either built templates or a raw mapping (e.g. a Hydra ``DictConfig``)."""
    return templates if isinstance(templates, StageBTemplates) else StageBTemplates.from_mapping(templates)


def format_guidance(guidance: Guidance | None, no_guidance: str) -> str:
    """Numbered experience lines; a mapping keeps its ids (``{"G3": …}``), a list is numbered ``G0…``.

    >>> format_guidance(["a", "b"], "无")
    'G0. a\\nG1. b'
    >>> format_guidance({"G2": "c"}, "无"), format_guidance([], "无")
    ('G2. c', '无')
    """
    items = list(guidance.items()) if isinstance(guidance, Mapping) else list(enumerate(guidance or ()))
    lines = [f"{key if isinstance(key, str) else f'G{key}'}. {text.strip()}" for key, text in items]
    return "\n".join(lines) if lines else no_guidance


def format_summaries(summaries: Sequence[str]) -> str:
    """``图片_i: <summary>`` lines in image order."""
    return "\n".join(f"{image_key(i)}: {summary}" for i, summary in enumerate(summaries, start=1))


def record_summaries(record: Mapping[str, Any]) -> list[str]:
    """The summaries of a normalised Stage-A record, ordered ``图片_1..N`` (keys checked by the builder)."""
    per_image: Mapping[str, str] = record["per_image"]
    return [per_image[image_key(i)] for i in range(1, len(per_image) + 1)]


def render_stage_b_messages(
    record: Mapping[str, Any],
    templates: StageBTemplates | Mapping[str, Any],
    guidance: Guidance | None,
) -> list[dict[str, str]]:
    """System + user messages for one Stage-A record (``mission`` and ``per_image`` with ``图片_i`` keys)."""
    tpl = as_templates(templates)
    mission = record["mission"]
    if mission not in tpl.mission_focus:
        raise KeyError(f"no mission_focus for mission {mission!r}; known: {sorted(tpl.mission_focus)}")
    summaries = record_summaries(record)
    user = tpl.user.format(
        mission=mission,
        mission_focus=tpl.mission_focus[mission],
        guidance=format_guidance(guidance, tpl.no_guidance),
        summaries=format_summaries(summaries),
        num_images=len(summaries),
    )
    return [{"role": "system", "content": tpl.system}, {"role": "user", "content": user}]
