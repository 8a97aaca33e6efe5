"""Write a Stage-A input tree of field-like photos: tickets of 1..20 photos, every size and orientation.

The SPEC §3 layout (``<root>/<mission>/<审核通过|审核不通过>/<ticket>/<images>``), JPEG photos in the sizes of
``bench/stage_a.py --mixed`` (phone photos up to 4000x3000 in both orientations, 16:9 / 9:16, squares, small
screenshots). For timing Stage-A through the entry point on the data users have:

    python bench/mixed_tree.py --out /tmp/mixed_tree --photos 1000
    python -m bbuqc_lightning.train +experiment=stage_a model=qwen3_vl_4b model.random_init=true trainer=gpu \
        data.root=/tmp/mixed_tree data.batch_size=128 data.num_workers=8 logger=csv
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

from stage_a import field_sizes, photo

from bbuqc_lightning.constants import MISSIONS


def write_tree(out: Path, photos: int, seed: int = 0) -> int:
    """Write about ``photos`` images (whole tickets); returns the number written."""
    rng = random.Random(seed)
    sizes = field_sizes(photos, seed)
    missions = sorted(MISSIONS)
    encoded: dict[tuple[tuple[int, int], int], bytes] = {}  # JPEG bytes per (size, variant): encode once
    written, ticket = 0, 0
    while written < photos:
        count = min(rng.randint(1, 20), photos - written)
        mission = missions[ticket % len(missions)]
        label = "审核通过" if rng.random() < 0.5 else "审核不通过"
        folder = out / mission / label / f"QC-TEMP-20250118-{ticket:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            key = (sizes[written], written % 8)
            if key not in encoded:
                buffer = io.BytesIO()
                photo(*key).save(buffer, format="JPEG", quality=85)
                encoded[key] = buffer.getvalue()
            (folder / f"IMG_{i + 1:02d}.jpg").write_bytes(encoded[key])
            written += 1
        ticket += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{write_tree(Path(args.out), args.photos, args.seed)} photos under {args.out}")


if __name__ == "__main__":
    main()
