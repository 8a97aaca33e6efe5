"""One Stage-A output, one configuration: the settings that shape a summary are recorded beside the JSONL.

``stage_a.jsonl.settings.json`` holds the model, the prompts and the generation settings of the lines
in ``stage_a.jsonl``. A rerun into the same output (a resume) compares its own settings with the last
recorded ones: a difference is an error naming every changed key, so a resume with, say, fewer new
tokens cannot silently leave one file with two kinds of summaries. ``append_anyway=True`` (config
``stage_a.append_anyway=true``) writes anyway and records the new settings as a further entry, so the
file says it is mixed. Why a side file and not a header line: every line of the JSONL stays one group,
which is what Stage-B and other readers of SPEC §4 expect.

Example::

    if check_output_settings("out/stage_a.jsonl", {"generation": {"max_new_tokens": 128}}):
        record_output_settings("out/stage_a.jsonl", {"generation": {"max_new_tokens": 128}})
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class SettingsMismatchError(ValueError):
    """A resume into an output written with other settings."""


def settings_path(output: str | Path) -> Path:
    """``stage_a.jsonl`` -> ``stage_a.jsonl.settings.json`` (next to the output)."""
    output = Path(output)
    return output.with_name(f"{output.name}.settings.json")


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are compared whole).

    >>> flatten({"model": {"name": "x", "dtype": "bf16"}, "prompts": {}})
    {'model.name': 'x', 'model.dtype': 'bf16', 'prompts': {}}
    """
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs (missing on one side counts)."""
    a, b = flatten(old), flatten(new)
    missing = object()
    changed = [k for k in sorted(a.keys() | b.keys()) if a.get(k, missing) != b.get(k, missing)]
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in changed]


def check_output_settings(
    output: str | Path, settings: Mapping[str, Any], append_anyway: bool = False
) -> bool:
    """Raise :class:`SettingsMismatchError` when ``output`` holds lines of other settings (unless appending).

    Returns whether ``settings`` still need recording (:func:`record_output_settings`). Read-only, so every
    DDP rank can check before the run while one rank records.
    """
    output = Path(output)
    settings = _plain(settings)
    history = _history(output)
    if not _has_lines(output):
        return True
    if not history:
        log.warning("%s has lines but no record of their settings: recording this run's", output)
        return True
    if history[-1] == settings:
        return False
    changed = differences(history[-1], settings)
    if not append_anyway:
        raise SettingsMismatchError(
            f"{output} was written with other settings ({'; '.join(changed)}); write to a new "
            "stage_a.output_jsonl, or set stage_a.append_anyway=true to add lines of these settings to it"
        )
    log.warning("%s: appending with other settings (%s), as asked", output, "; ".join(changed))
    return True


def record_output_settings(output: str | Path, settings: Mapping[str, Any]) -> None:
    """Add ``settings`` to the record of ``output`` (a fresh record when the output has no lines yet)."""
    output = Path(output)
    history = _history(output) if _has_lines(output) else []
    settings = _plain(settings)
    if not history or history[-1] != settings:
        _write_atomic(settings_path(output), [*history, settings])


def _plain(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Plain JSON types, as they read back from the record."""
    return json.loads(json.dumps(dict(settings), ensure_ascii=False))


def _has_lines(output: Path) -> bool:
    return output.is_file() and output.stat().st_size > 0


def _history(output: Path) -> list[dict[str, Any]]:
    side = settings_path(output)
    return json.loads(side.read_text(encoding="utf-8")) if side.is_file() else []


def _write_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
