"""Image summary prompts (Stage-A and the fusion SFT summary mode); the texts live in conf/prompts/stage_a.yaml."""

from __future__ import annotations

from collections.abc import Mapping

from bbuqc_lightning.constants import MISSIONS


def stage_a_prompt(prompts: Mapping[str, object], mission: str) -> str:
    """``common`` + the mission's paragraph, with ``{mission}`` filled in.

    Raises ``KeyError`` naming the mission when the config has no prompt for it.
    """
    missions = prompts["missions"]
    assert isinstance(missions, Mapping)
    if mission not in missions:
        raise KeyError(
            f"prompts.stage_a.missions has no prompt for mission {mission!r}; known: {sorted(MISSIONS)}"
        )
    return f"{prompts['common']}\n{str(missions[mission]).format(mission=mission)}"


def image_conversation(prompt: str) -> list[dict]:
    """One user turn: the image placeholder then the prompt (the processor inserts the image tokens)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
