"""Review mode: apply (or discard) the proposals a person approved from ``pending_proposals.jsonl``.

With ``module.runner.review_mode=true`` the runner never changes a mission's guidance; it queues every
valid proposal in ``<mission folder>/pending_proposals.jsonl`` (each with a ``proposal_id``). A person
reads them and runs ``tools/approve_guidance.py``, which calls :func:`review_pending`: approved proposals
are checked again against the *current* guidance (an id may have been deleted since) and applied as one
new version (``guidance.json`` + snapshot); every decision is appended to ``reflection.jsonl``
(``status`` ``applied`` | ``rejected`` | ``discarded``, with ``proposal_id`` and ``approved_by``); the
decided proposals leave the pending file (rewritten atomically). The next run continues from the new
guidance when it writes into the same folder.

Example::

    result = review_pending(Path("/data/qc/stage_b/bbu_grounding"), approve=None)  # approve everything
    result.applied, result.rejected, result.version
"""

from __future__ import annotations

import getpass
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bbuqc_lightning.data.jsonl import read_jsonl
from bbuqc_lightning.stage_b_runner.artifacts import PENDING, REFLECTION, MissionArtifacts
from bbuqc_lightning.stage_b_runner.guidance import GuidanceLimits, Operation, apply_operations
from bbuqc_lightning.stage_b_runner.reflection_round import change_row, rejection_row


@dataclass
class ReviewResult:
    applied: list[str] = field(default_factory=list)  # proposal ids
    rejected: list[str] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)
    still_pending: int = 0
    version: int = 0
    experiences: int = 0


def _operation(row: dict[str, Any], where: str) -> Operation:
    try:
        return Operation(row["op"], row.get("id"), row.get("text"), tuple(row["evidence"]), row["reason"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{where}: proposal {row.get('proposal_id')!r} is malformed ({err})") from err


def review_pending(
    folder: Path,
    approve: Collection[str] | None = None,
    discard: Collection[str] = (),
    limits: GuidanceLimits | None = None,
    reviewer: str | None = None,
) -> ReviewResult:
    """Apply the approved pending proposals of one mission folder (``approve=None``: all not discarded)."""
    files = MissionArtifacts(folder, run_id="review-" + datetime.now().strftime("%Y%m%d-%H%M%S"))
    guidance = files.load_guidance(limits or GuidanceLimits())
    if guidance is None:
        raise FileNotFoundError(f"{folder}: no guidance.json (is this a mission folder of the runner?)")
    pending = read_jsonl(files.path(PENDING))
    known = {row.get("proposal_id") for row in pending}
    unknown = sorted((set(approve or ()) | set(discard)) - known)
    if unknown:
        raise ValueError(
            f"{files.path(PENDING)}: no pending proposal {unknown}; pending: {sorted(map(str, known))}"
        )
    discard = set(discard)
    chosen = [
        r
        for r in pending
        if r["proposal_id"] not in discard and (approve is None or r["proposal_id"] in approve)
    ]
    ops = [_operation(r, str(files.path(PENDING))) for r in chosen]
    by_op = {id(op): row["proposal_id"] for op, row in zip(ops, chosen, strict=True)}
    new, changes, rejections = apply_operations(guidance, ops)
    result = ReviewResult(version=new.version, experiences=len(new.experiences))
    base = {
        "mission": guidance.mission,
        "guidance_version": guidance.version,
        "approved_by": reviewer or getpass.getuser(),
    }
    for change in changes:
        pid = by_op[id(change.operation)]
        files.append(REFLECTION, {**base, "proposal_id": pid, **change_row(change, "applied", new.version)})
        result.applied.append(pid)
    for rejection in rejections:
        pid = by_op[id(rejection.operation)]
        files.append(REFLECTION, {**base, "proposal_id": pid, **rejection_row(rejection)})
        result.rejected.append(pid)
    for row in pending:
        if row["proposal_id"] in discard:
            files.append(REFLECTION, {**base, "proposal_id": row["proposal_id"], "status": "discarded"})
            result.discarded.append(row["proposal_id"])
    if changes:
        files.save_guidance(new)
    decided = set(result.applied) | set(result.rejected) | discard
    remaining = [r for r in pending if r["proposal_id"] not in decided]
    files.replace(PENDING, remaining)
    files.close()
    result.still_pending = len(remaining)
    return result
