"""The runner's files, one folder per mission (``<output_dir>/<mission slug>/``)::

    guidance.json                 current guidance (atomic rewrite)
    snapshots/guidance_v0003.json one per version (the newest ``snapshot_retention`` kept)
    trajectories.jsonl            every rollout: epoch, guidance version, raw text, parsed verdict, validity
    selections.jsonl              the selected answer per group and epoch: vote_strength, label_match, conflict_flag
    reflection.jsonl              every reflection outcome, one row per operation: status applied | pending |
                                  rejected, or invalid_output for an answer that is not JSON (raw text kept)
    pending_proposals.jsonl       review mode: proposals waiting for a person (tools/approve_guidance.py)
    manual_review_queue.jsonl     groups whose final selection is invalid (SPEC §5), replaced each run
    distill_chatml.jsonl          distillation (callbacks/distillation.py), replaced atomically each run

Streamed files are appended line by line with :class:`~bbuqc_lightning.data.jsonl.JsonlAppender` (a kill
leaves at most a torn last line, cut on the next open); every row carries the ``run_id``, so reruns into
the same folder append an auditable history. A rerun into a folder that has ``guidance.json`` continues
from it (versions keep counting, snapshots never clash); ``<output_dir>/runner_progress.json`` makes a rerun
after an interrupted run resume it (:mod:`bbuqc_lightning.stage_b_runner.progress`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from bbuqc_lightning.constants import MISSIONS
from bbuqc_lightning.data.jsonl import JsonlAppender, atomic_write, atomic_write_jsonl
from bbuqc_lightning.stage_b_runner.guidance import GuidanceLimits, MissionGuidance

log = logging.getLogger(__name__)

GUIDANCE = "guidance.json"
SNAPSHOTS = "snapshots"
TRAJECTORIES = "trajectories.jsonl"
SELECTIONS = "selections.jsonl"
REFLECTION = "reflection.jsonl"
PENDING = "pending_proposals.jsonl"
MANUAL_REVIEW = "manual_review_queue.jsonl"
_SNAPSHOT = re.compile(r"^guidance_v([0-9]+)\.json$")


def mission_slug(mission: str) -> str:
    """The folder name of a mission (SPEC §2 slug); a clear error for an unknown mission."""
    if mission not in MISSIONS:
        raise ValueError(f"unknown mission {mission!r}; known: {sorted(MISSIONS)}")
    return MISSIONS[mission]


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (temp file, fsync, ``os.replace``)."""
    atomic_write(path, [text.encode("utf-8")])


def snapshot_versions(folder: Path) -> list[int]:
    """Versions that have a snapshot in ``folder/snapshots``, ascending (natural, not lexicographic)."""
    snap_dir = folder / SNAPSHOTS
    if not snap_dir.is_dir():
        return []
    found = (_SNAPSHOT.match(p.name) for p in snap_dir.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def read_guidance_file(path: Path, limits: GuidanceLimits) -> MissionGuidance:
    """One mission's ``guidance.json`` (errors name the file)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: guidance must be a JSON object")
    return MissionGuidance.from_json(data, str(path), limits)


class MissionArtifacts:
    """The files of one mission (see the module docstring)."""

    def __init__(self, folder: Path, run_id: str, fsync: bool = True, snapshot_retention: int | None = None):
        self.folder = folder
        self.run_id = run_id
        self.fsync = fsync
        self.snapshot_retention = snapshot_retention
        self._appenders: dict[str, JsonlAppender] = {}

    def path(self, name: str) -> Path:
        return self.folder / name

    def append(self, name: str, row: dict[str, Any]) -> None:
        """Append ``row`` (with ``run_id``) to the streamed file ``name``; durable on return."""
        appender = self._appenders.get(name)
        if appender is None:
            appender = self._appenders[name] = JsonlAppender(self.path(name), fsync=self.fsync)
            appender.open()
        appender.append({"run_id": self.run_id, **row})

    def replace(self, name: str, rows: list[dict[str, Any]]) -> Path:
        """Rewrite the whole file ``name`` atomically (manual review queue, distillation)."""
        atomic_write_jsonl(self.path(name), rows, fsync=self.fsync)
        return self.path(name)

    def load_guidance(self, limits: GuidanceLimits) -> MissionGuidance | None:
        path = self.path(GUIDANCE)
        return read_guidance_file(path, limits) if path.exists() else None

    def save_guidance(self, guidance: MissionGuidance) -> Path:
        """Write ``guidance.json`` and its version's snapshot, then prune old snapshots."""
        text = json.dumps(guidance.to_json(), ensure_ascii=False, indent=2) + "\n"
        snapshot = self.folder / SNAPSHOTS / f"guidance_v{guidance.version:04d}.json"
        atomic_write_text(snapshot, text)
        atomic_write_text(self.path(GUIDANCE), text)
        self._prune_snapshots()
        return self.path(GUIDANCE)

    def _prune_snapshots(self) -> None:
        if self.snapshot_retention is None:
            return
        versions = snapshot_versions(self.folder)
        for version in versions[: max(0, len(versions) - self.snapshot_retention)]:
            (self.folder / SNAPSHOTS / f"guidance_v{version:04d}.json").unlink(missing_ok=True)

    def close(self) -> None:
        for appender in self._appenders.values():
            appender.close()
        self._appenders.clear()


class RunArtifacts:
    """Per-mission :class:`MissionArtifacts` under one output folder, opened on first use."""

    def __init__(
        self, output_dir: str | Path, run_id: str, fsync: bool = True, snapshot_retention: int | None = None
    ):
        self.root = Path(output_dir)
        self.run_id = run_id
        self.fsync = fsync
        self.snapshot_retention = snapshot_retention
        self._missions: dict[str, MissionArtifacts] = {}

    def mission(self, mission: str) -> MissionArtifacts:
        if mission not in self._missions:
            folder = self.root / mission_slug(mission)
            self._missions[mission] = MissionArtifacts(
                folder, self.run_id, self.fsync, self.snapshot_retention
            )
        return self._missions[mission]

    def close(self) -> None:
        for artifacts in self._missions.values():
            artifacts.close()
