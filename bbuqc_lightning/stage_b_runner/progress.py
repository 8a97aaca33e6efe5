"""Resume of the training-free runner: a rerun into the folder of an interrupted run continues it.

``<output_dir>/runner_progress.json`` (rewritten atomically) says how far the last run got:

- at every epoch start, the state to return to if this epoch does not complete: the byte size of every
  streamed file (``trajectories.jsonl``, ``selections.jsonl``, ...) and each mission's ``guidance.json``
  text and snapshot versions;
- at every epoch end (selections, reflection and guidance written): epochs completed, phase, which
  missions converged;
- at the end of the run: ``finished``.

A rerun into a folder whose last run did not finish *resumes* it: an epoch that was cut short is discarded
as a whole (files cut back to their sizes at its start, guidance and snapshots as they were), then the run
continues at the next epoch with what is left of ``trainer.max_epochs`` (counted over both runs). A rerun
after a finished run starts a new run from the folder's guidance (review mode: after approvals), as
before. Why byte sizes and not row filters: the streamed files are append-only, so cutting them back is
exact and needs no knowledge of their rows.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bbuqc_lightning.constants import MISSIONS
from bbuqc_lightning.stage_b_runner.artifacts import (
    GUIDANCE,
    PENDING,
    REFLECTION,
    SELECTIONS,
    SNAPSHOTS,
    TRAJECTORIES,
    atomic_write_text,
    snapshot_versions,
)

log = logging.getLogger(__name__)

PROGRESS = "runner_progress.json"
STREAMED = (TRAJECTORIES, SELECTIONS, REFLECTION, PENDING)


def _mission_folders(root: Path) -> list[Path]:
    slugs = set(MISSIONS.values())
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name in slugs) if root.is_dir() else []


@dataclass
class EpochStart:
    """What an epoch that does not complete is rolled back to (paths relative to the output folder)."""

    sizes: dict[str, int] = field(default_factory=dict)
    guidance: dict[str, str | None] = field(default_factory=dict)  # mission folder -> guidance.json text
    snapshots: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class RunnerProgress:
    run_id: str
    epochs_done: int = 0
    phase: str = "reflect"
    converged: dict[str, bool] = field(default_factory=dict)
    finished: bool = False
    epoch_start: EpochStart | None = None  # set while an epoch runs


def load_progress(root: str | Path) -> RunnerProgress | None:
    path = Path(root) / PROGRESS
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    start = data.pop("epoch_start", None)
    return RunnerProgress(**data, epoch_start=EpochStart(**start) if start else None)


def save_progress(root: str | Path, progress: RunnerProgress) -> None:
    atomic_write_text(
        Path(root) / PROGRESS, json.dumps(asdict(progress), ensure_ascii=False, indent=2) + "\n"
    )


def capture_epoch_start(root: str | Path) -> EpochStart:
    """The streamed files' sizes and every mission folder's guidance, as they are now."""
    root = Path(root)
    start = EpochStart()
    for folder in _mission_folders(root):
        for name in STREAMED:
            path = folder / name
            if path.is_file():
                start.sizes[f"{folder.name}/{name}"] = path.stat().st_size
        guidance = folder / GUIDANCE
        start.guidance[folder.name] = guidance.read_text(encoding="utf-8") if guidance.is_file() else None
        start.snapshots[folder.name] = snapshot_versions(folder)
    return start


def roll_back(root: str | Path, start: EpochStart) -> int:
    """Undo an epoch that did not complete; returns the bytes of streamed rows discarded."""
    root = Path(root)
    discarded = 0
    for folder in _mission_folders(root):
        for name in STREAMED:
            path = folder / name
            if path.is_file():
                keep = start.sizes.get(f"{folder.name}/{name}", 0)
                discarded += max(0, path.stat().st_size - keep)
                os.truncate(path, min(keep, path.stat().st_size))
        guidance = start.guidance.get(folder.name)
        if guidance is None:
            (folder / GUIDANCE).unlink(missing_ok=True)
        else:
            atomic_write_text(folder / GUIDANCE, guidance)
        kept = set(start.snapshots.get(folder.name, []))
        for version in snapshot_versions(folder):
            if version not in kept:
                (folder / SNAPSHOTS / f"guidance_v{version:04d}.json").unlink()
    return discarded


def resume_or_start(root: str | Path, run_id: str) -> RunnerProgress:
    """The progress to continue from: the interrupted run's (rolled back to its last whole epoch), or a new one."""
    previous = load_progress(root)
    if previous is None or previous.finished:
        progress = RunnerProgress(run_id)
    else:
        progress = previous
        if previous.epoch_start is not None:
            discarded = roll_back(root, previous.epoch_start)
            log.warning(
                "runner: discarded the unfinished epoch %d of run %s (%d bytes of rows)",
                previous.epochs_done, previous.run_id, discarded,
            )  # fmt: skip
            progress.epoch_start = None
        log.info(
            "runner: resuming run %s after %d completed epoch(s), phase %s",
            previous.run_id, previous.epochs_done, previous.phase,
        )  # fmt: skip
    save_progress(root, progress)
    return progress


def begin_epoch(root: str | Path, progress: RunnerProgress) -> None:
    """Record what this epoch rolls back to if it does not complete."""
    progress.epoch_start = capture_epoch_start(root)
    save_progress(root, progress)


def end_epoch(
    root: str | Path, progress: RunnerProgress, epochs_done: int, phase: str, converged: dict[str, bool]
) -> None:
    """Every file of the epoch is written: a resume continues after it."""
    progress.epochs_done, progress.phase, progress.converged = epochs_done, phase, dict(converged)
    progress.epoch_start = None
    save_progress(root, progress)


def finish(root: str | Path, progress: RunnerProgress) -> None:
    progress.finished = True
    save_progress(root, progress)
