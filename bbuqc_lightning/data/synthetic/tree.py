"""The synthetic data set on disk: the SPEC §3 image tree, reference Stage-A JSONL and a manifest.

``ensure_synthetic(**cfg.synthetic)`` is what the DataModules call on first use; ``generate_synthetic``
rewrites a data set; ``tools/make_synthetic.py`` is the command line. Scenes, summaries and labels come from
:mod:`~bbuqc_lightning.data.synthetic.scenes`, pictures from :mod:`~bbuqc_lightning.data.synthetic.render`; image order is
the tree scanner's own (:func:`~bbuqc_lightning.data.tree.natural_sort_key`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from PIL import Image

from bbuqc_lightning.constants import LABEL_DIR_NAMES, LABELS, MISSIONS, image_key, ticket_key
from bbuqc_lightning.data.synthetic.render import render_image
from bbuqc_lightning.data.synthetic.scenes import GroupScene, generate_group
from bbuqc_lightning.data.tree import natural_sort_key

# ---------------------------------------------------------------- the data set on disk

DEFAULT_GROUPS_PER_SPLIT: Final[dict[str, int]] = {"train": 8, "val": 4, "test": 4}

log = logging.getLogger(__name__)


def generate_synthetic(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    groups_per_split: Mapping[str, int] | None = None,
    image_size: Sequence[int] = (320, 240),
) -> dict:
    """Writes the synthetic data set to ``out_dir`` and returns its manifest (also ``manifest.json``).

    Layout: ``<split>/<mission>/<审核通过|审核不通过>/<group_dir>/<images>`` plus ``stage_a_<split>.jsonl``
    (reference summaries, SPEC §4). ``groups_per_split`` counts groups per mission per split. The tree
    is built in a sibling temp folder and renamed into place with the manifest written last, so an
    interrupted run never looks complete; an earlier generated tree at ``out_dir`` is replaced.
    """
    return write_synthetic_tree(Path(out_dir), seed, groups_per_split, image_size, replace_existing=True)


def ensure_synthetic(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    groups_per_split: Mapping[str, int] | None = None,
    image_size: Sequence[int] = (320, 240),
) -> Path:
    """Generates the data set only when ``<out_dir>/manifest.json`` is missing; returns ``out_dir``."""
    out = Path(out_dir)
    if not (out / "manifest.json").exists():
        log.info("generating the synthetic data set under %s (first use; later runs reuse it)", out)
        start = time.perf_counter()
        write_synthetic_tree(out, seed, groups_per_split, image_size, replace_existing=False)
        log.info("synthetic data set ready in %.1f s", time.perf_counter() - start)
    return out


# ---------------------------------------------------------------- the SPEC §3 tree on disk

_FOLDER_SUFFIXES: Final = ("补拍", "复检")  # resubmission folders: <id>-补拍
_NO_ID_FOLDER: Final = "现场照片"  # folders named without the id: the id is in the image names
_GENERATOR: Final = "bbuqc_lightning.data.synthetic.scenes"


def _folders(rng: random.Random, group_id: str, n_images: int, serial: int) -> list[tuple[str, list[str]]]:
    """Folder and image names of one ticket in scanner order, with the quirks of field data."""
    style = rng.random()
    if style < 0.12:
        names = [f"{group_id}_{n}.jpeg" for n in rng.sample(range(1_000_000, 10_000_000), n_images)]
        return [(f"{_NO_ID_FOLDER}{serial}", sorted(names, key=natural_sort_key))]
    exts = rng.choices((".jpg", ".png", ".JPG"), weights=(8, 1, 1), k=n_images)
    names = [f"IMG_{n}{ext}" for n, ext in zip(rng.sample(range(1, 13), n_images), exts, strict=True)]
    if style < 0.27:  # one ticket split over <id> and <id>-补拍: folders in name order, not a global sort
        cut = rng.randint(1, n_images - 1)
        pairs = [(group_id, names[:cut]), (f"{group_id}-{_FOLDER_SUFFIXES[0]}", names[cut:])]
    else:
        pairs = [(f"{group_id}-{rng.choice(_FOLDER_SUFFIXES)}" if style < 0.42 else group_id, names)]
    return sorted(
        ((f, sorted(n, key=natural_sort_key)) for f, n in pairs), key=lambda p: natural_sort_key(p[0])
    )


def _save(image: Image.Image, path: Path) -> None:
    """Fixed encoder settings and no metadata, so the same seed gives byte-identical files."""
    if path.suffix.lower() == ".png":
        image.save(path, format="PNG")
    else:
        image.save(path, format="JPEG", quality=90)


def _write_group(
    label_dir: Path,
    group: GroupScene,
    group_id: str,
    files: list[tuple[str, str]],
    size: tuple[int, int],
    seed: int,
) -> dict:
    """Draws and saves one ticket's photos; returns its Stage-A reference record (SPEC §4)."""
    for k, ((folder, name), image) in enumerate(zip(files, group.images, strict=True)):
        (label_dir / folder).mkdir(parents=True, exist_ok=True)
        _save(render_image(image, size, seed=f"{seed}:{group_id}:{k}"), label_dir / folder / name)
    return {
        "group_id": group_id,
        "ticket_key": ticket_key(group_id, group.label),
        "mission": group.mission,
        "label": group.label,
        "images": [name for _, name in files],
        "per_image": {image_key(k + 1): s for k, s in enumerate(group.summaries())},
    }


def _write_split(root: Path, split: str, n: int, seed: int, size: tuple[int, int], serial: int) -> dict:
    """Writes ``n`` groups per mission of one split and its JSONL; pass/fail targets alternate."""
    counts = {mission: dict.fromkeys(LABELS, 0) for mission in MISSIONS}
    lines: list[str] = []
    for m, (mission, slug) in enumerate(MISSIONS.items()):
        for i in range(n):
            rng = random.Random(f"{seed}:{split}:{slug}:{i}")
            group = generate_group(mission, LABELS[(i + m) % 2], rng)
            number = serial + len(lines)
            group_id = f"QC-TEMP-2025{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}-{number:07d}"
            folders = _folders(rng, group_id, len(group.images), number)
            files = [(folder, name) for folder, names in folders for name in names]
            label_dir = root / split / mission / LABEL_DIR_NAMES[group.label]
            record = _write_group(label_dir, group, group_id, files, size, seed)
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            counts[mission][group.label] += 1
    (root / f"stage_a_{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    n_images = sum(1 for p in (root / split).rglob("*") if p.is_file())
    jsonl = f"stage_a_{split}.jsonl"
    return {"root": split, "stage_a_jsonl": jsonl, "groups": len(lines), "images": n_images, "labels": counts}


def _read_manifest(out: Path) -> dict | None:
    """The manifest of a tree this generator wrote, else ``None`` (so foreign folders are never deleted)."""
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("generator") == _GENERATOR else None


def _publish(tmp: Path, out: Path, replace_existing: bool) -> bool:
    """Renames the finished ``tmp`` tree to ``out``; False when a complete tree there is kept instead."""
    if out.exists():
        if _read_manifest(out) is None and any(out.iterdir()):
            shutil.rmtree(tmp)
            raise FileExistsError(f"{out} exists and is not a generated synthetic tree; not replacing it")
        if _read_manifest(out) is not None and not replace_existing:
            shutil.rmtree(tmp)  # another process finished first: keep its tree
            return False
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
        return True
    tmp.rename(out)
    return True


def write_synthetic_tree(
    out: Path,
    seed: int,
    groups_per_split: Mapping[str, int] | None,
    image_size: Sequence[int],
    replace_existing: bool,
) -> dict:
    """Implements :func:`generate_synthetic` and :func:`ensure_synthetic` (see there)."""
    splits = {str(k): int(v) for k, v in (groups_per_split or DEFAULT_GROUPS_PER_SPLIT).items()}
    size = (int(image_size[0]), int(image_size[1]))
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest: dict = {"generator": _GENERATOR, "version": 1, "seed": seed, "image_size": list(size)}
    manifest |= {"groups_per_split": splits, "missions": dict(MISSIONS), "splits": {}}
    serial = 10_000  # group serials run on over all splits, so ids never collide between splits
    try:
        for split, n in splits.items():
            manifest["splits"][split] = _write_split(tmp, split, n, seed, size, serial)
            serial += manifest["splits"][split]["groups"]
        text = json.dumps(manifest, ensure_ascii=False, indent=2) + "\n"
        (tmp / "manifest.json").write_text(text, encoding="utf-8")  # last: its presence means complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest if _publish(tmp, out, replace_existing) else (_read_manifest(out) or manifest)
