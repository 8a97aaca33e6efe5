"""Approve the guidance changes that review mode queued (``module.runner.review_mode=true``).

The runner wrote every valid proposal to ``<mission folder>/pending_proposals.jsonl`` without applying it.
Read them, then apply all, some, or discard some; the guidance gets one new version (+ snapshot) and every
decision is logged in ``reflection.jsonl`` with your user name::

    python tools/approve_guidance.py /data/qc/stage_b/bbu_grounding --list
    python tools/approve_guidance.py /data/qc/stage_b/bbu_grounding                      # approve all
    python tools/approve_guidance.py /data/qc/stage_b/bbu_grounding --approve '<proposal_id>' \\
        --discard '<proposal_id>'

Then rerun the runner into the same folder (``module.runner.output_dir=/data/qc/stage_b``): it continues
from the approved guidance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mission_dir", type=Path, help="a mission folder of the runner (holds guidance.json)")
    parser.add_argument("--list", action="store_true", help="show the pending proposals and exit")
    parser.add_argument("--approve", nargs="+", metavar="ID", help="approve only these proposal ids")
    parser.add_argument("--discard", nargs="+", metavar="ID", default=[], help="drop these proposals")
    parser.add_argument("--max-experiences", type=int, default=20, help="the guidance size cap to enforce")
    parser.add_argument("--max-experience-chars", type=int, default=200)
    parser.add_argument("--reviewer", default=None, help="name logged as approved_by (default: your user)")
    args = parser.parse_args(argv)
    # Imported after parsing: the review pulls in torch (through the runner's modules); --help stays instant.
    from bbuqc_lightning.data.jsonl import read_jsonl
    from bbuqc_lightning.stage_b_runner.artifacts import PENDING
    from bbuqc_lightning.stage_b_runner.guidance import GuidanceLimits
    from bbuqc_lightning.stage_b_runner.review import review_pending

    if args.list:
        pending = args.mission_dir / PENDING
        rows = read_jsonl(pending)
        for row in rows:
            target = row.get("id") or "(new)"
            print(f"{row['proposal_id']}  {row['op']} {target}: {row.get('text') or ''}  | {row['reason']}")
        if not rows:
            print(f"no pending proposals in {pending}")
        return 0
    limits = GuidanceLimits(args.max_experiences, args.max_experience_chars)
    try:
        result = review_pending(args.mission_dir, args.approve, args.discard, limits, args.reviewer)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"applied {len(result.applied)}, rejected {len(result.rejected)}, discarded {len(result.discarded)}, "
        f"still pending {result.still_pending}; guidance v{result.version} with {result.experiences} experiences"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
