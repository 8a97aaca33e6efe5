"""Scores a Stage-A JSONL against reference summaries of the same tickets (SPEC §4 grammar, SPEC §6 keys).

    python tools/score_stage_a.py outputs/stage_a/runs/<run>/stage_a.jsonl data/synthetic/stage_a_test.jsonl
    python tools/score_stage_a.py <generated.jsonl> <reference.jsonl> --worst 20 --json scores.json
    python tools/score_stage_a.py <generated.jsonl> /data/fusion/bbu_val.jsonl --root /data/qc/val   # per-photo file

Prints ``stage_a/object_precision|object_recall|object_f1``, ``stage_a/exact_match``,
``stage_a/irrelevant_accuracy``, ``stage_a/negative_item_recall`` (overall and ``/<mission slug>``) and the worst
lines. No model is loaded:
``+experiment=stage_a`` (which scores itself) and ``+experiment=e2e`` run the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bbuqc_lightning.data.tree import scan_tree
from bbuqc_lightning.summaries.scoring import WORST_COLUMNS, score_stage_a_files


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generated", type=Path, help="Stage-A JSONL written by a model")
    parser.add_argument("reference", type=Path, help="Stage-A JSONL of reference summaries")
    parser.add_argument(
        "--root",
        type=Path,
        help="the image tree the generated file came from (needed for a per-photo summary file)",
    )
    parser.add_argument("--worst", type=int, default=10, help="worst lines to print (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write metrics and worst lines to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for path in (args.generated, args.reference):
        if not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
    try:
        records = scan_tree(args.root, strict=False).records if args.root else ()
        scores = score_stage_a_files(args.generated, args.reference, records=records)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = scores.metrics()
    for key, value in sorted(metrics.items()):
        print(f"{key}\t{value:.4f}")
    worst = [line.table_row() for line in scores.worst(args.worst)]
    for row in worst:
        print("\t".join(str(v) for v in row))
    if args.json:
        args.json.write_text(
            json.dumps({"metrics": metrics, "worst": [dict(zip(WORST_COLUMNS, r, strict=True)) for r in worst]},
                       ensure_ascii=False, indent=2),
            encoding="utf-8",
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
