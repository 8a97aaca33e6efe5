"""Writes the synthetic BBU-QC data set (SPEC §3 image tree + Stage-A reference JSONL).

    python tools/make_synthetic.py --out data/synthetic --seed 0 --train 8 --val 4 --test 4 \\
        --width 320 --height 240

Counts are groups per mission per split. An existing generated tree at ``--out`` is replaced.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from bbuqc_lightning.data.synthetic.tree import DEFAULT_GROUPS_PER_SPLIT, generate_synthetic


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/synthetic", help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical files")
    for split, count in DEFAULT_GROUPS_PER_SPLIT.items():
        parser.add_argument(f"--{split}", type=int, default=count, help=f"{split} groups per mission")
    parser.add_argument("--width", type=int, default=320, help="image width in pixels")
    parser.add_argument("--height", type=int, default=240, help="image height in pixels")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if min(args.width, args.height) < 1:
        parser.error("--width and --height must be positive")
    counts = {split: getattr(args, split) for split in DEFAULT_GROUPS_PER_SPLIT}
    if min(counts.values()) < 0:
        parser.error("group counts must be >= 0")
    manifest = generate_synthetic(args.out, args.seed, counts, (args.width, args.height))
    print(f"synthetic data set -> {args.out} (seed {args.seed}, {args.width}x{args.height})")
    for split, info in manifest["splits"].items():
        pass_n = sum(labels["pass"] for labels in info["labels"].values())
        print(
            f"  {split:5s} {info['groups']:4d} groups ({pass_n} pass / {info['groups'] - pass_n} fail), "
            f"{info['images']:5d} images, {info['stage_a_jsonl']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
