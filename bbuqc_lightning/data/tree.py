"""Scan the SPEC §3 input tree into group records (no image is decoded here).

Layout::

    <root>/<mission>/<label_dir>/<group_dir>/<images>     # labelled: 审核通过|审核不通过|pass|fail
    <root>/<mission>/<group_dir>/<images>                 # unlabelled (pure inference): label None

A mission folder is *labelled* when all its sub-folders are label folders and *unlabelled* when none
is; a mix is ambiguous (is ``pass`` a group?) and is a :class:`DataError` when ``strict`` (non-strict:
the non-label folders are skipped and recorded). Why decide per mission folder: one data drop often
mixes a labelled mission (training) and an unlabelled one (inference) under the same root.

Group ids come from :data:`~bbuqc_lightning.constants.GROUP_ID_PATTERN` (see :func:`extract_group_id`);
folders that map to the same id under the same mission *and* label are merged into one record
(``QC-X-20250118-15`` + ``QC-X-20250118-15-补拍``); the same id under both labels stays two records,
told apart by ``ticket_key``.

Bad input is never dropped silently: an unknown mission folder, an empty group, or a folder or image
whose name is not valid UTF-8 (Windows-made archives; such a name could not be written to the UTF-8
JSONL) raises :class:`DataError` naming the path when ``strict``, else it is listed in
:attr:`ScanResult.skipped` (and logged). Hidden folders (``.name``) and symlink loops are never read, and
always listed and logged. Paths in messages and in ``skipped`` reasons are shown with undecodable bytes
escaped (``IMG_\\xc3.jpg``, see :func:`shown`). Decoding problems (corrupt images, bombs) are found later by
:func:`bbuqc_lightning.data.images.validate_group_images`.

>>> natural_sort_key("img2.jpg") < natural_sort_key("img10.jpg")
True
>>> extract_group_id("QC-TEMP-20250118-0015123-补拍", None)
'QC-TEMP-20250118-0015123'
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from bbuqc_lightning.constants import (
    GROUP_ID_PATTERN,
    IMAGE_EXTENSIONS,
    LABEL_DIRS,
    LABELS,
    MISSIONS,
    OTHER_PHOTO_EXTENSIONS,
    ticket_key,
)

log = logging.getLogger(__name__)

_DIGITS = re.compile(r"([0-9]+)")


class DataError(ValueError):
    """Bad input data (layout, group, image); the message always names the offending path."""


class GroupRecord(NamedTuple):
    """One ticket: the images of one group id under one mission and label, in ``图片_1..N`` order.

    ``folders`` are the source folder paths (as strings, in name order); ``image_paths`` are the merged
    images of those folders, natural-sorted within each folder.

    Immutable and hashable. Why a ``NamedTuple`` and not a frozen dataclass: records travel inside
    Stage-A batches (``batch["meta"][i]["record"]``) and Lightning's ``batch_to_device`` rebuilds every
    dataclass in a batch with ``setattr``, which a frozen dataclass refuses (``ValueError: A frozen
    dataclass was passed to apply_to_collection``); named tuples are rebuilt through their constructor.
    """

    group_id: str
    ticket_key: str
    mission: str
    label: str | None
    image_paths: tuple[Path, ...]
    folders: tuple[str, ...]


@dataclass(frozen=True)
class SkippedGroup:
    """A folder left out with ``strict=False``, and why (kept for the log and the run summary)."""

    path: Path
    reason: str


@dataclass
class ScanResult:
    records: list[GroupRecord] = field(default_factory=list)
    skipped: list[SkippedGroup] = field(default_factory=list)


def natural_sort_key(name: str) -> tuple[tuple[object, ...], str]:
    """Sort key ordering embedded numbers by value: ``img2`` before ``img10`` (case-insensitive).

    The original name is the tie-breaker, so the order is total and deterministic.

    >>> sorted(["img10.jpg", "IMG2.jpg", "img1.jpg"], key=natural_sort_key)
    ['img1.jpg', 'IMG2.jpg', 'img10.jpg']
    """
    parts = _DIGITS.split(name)  # even indices: text, odd indices: digit runs -> types line up
    key = tuple(int(part) if i % 2 else part.casefold() for i, part in enumerate(parts))
    return key, name


def extract_group_id(folder_name: str, first_image_name: str | None) -> str:
    """Group id from the folder name, else from the first image's file name, else the folder name.

    >>> extract_group_id("site-7", "QC-TEMP-20241206-0015502_4348975.jpeg")
    'QC-TEMP-20241206-0015502'
    >>> extract_group_id("site-7", "IMG_01.jpg")
    'site-7'
    """
    for candidate in (folder_name, first_image_name):
        if candidate:
            match = GROUP_ID_PATTERN.match(candidate)
            if match:
                return match.group(1)
    return folder_name


def is_image_file(path: Path) -> bool:
    """A visible regular file with an image extension (any case): ``A.JPG`` is an image."""
    return path.is_file() and not _hidden(path) and path.suffix.lower() in IMAGE_EXTENSIONS


def shown(path: str | Path) -> str:
    """``path`` printable and UTF-8-encodable: bytes that are not UTF-8 become ``\\xNN`` escapes.

    >>> shown(Path(os.fsdecode(b"QC/IMG_\\xc3.jpg")))
    'QC/IMG_\\\\xc3.jpg'
    """
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def is_utf8_name(path: Path) -> bool:
    """Whether the file system gave ``path``'s name as valid UTF-8 (else it holds surrogate escapes)."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_symlink_loop(path: Path) -> bool:
    """A symbolic link that never resolves to a file or folder (a loop, or a chain too long)."""
    if not path.is_symlink():
        return False
    try:
        path.stat()
    except OSError as err:
        return err.errno == errno.ELOOP
    return False


def list_group_images(group_dir: Path, skipped: list[SkippedGroup] | None = None) -> list[Path]:
    """The images of one group folder, natural-sorted; other files are ignored (logged at debug; a photo in a format
    not read, e.g. HEIC or TIFF, with a warning).

    Symlink loops are logged and, when ``skipped`` is given, listed there.
    """
    images = []
    for child in group_dir.iterdir():
        if _hidden(child):
            continue
        if is_symlink_loop(child):
            _note(skipped, child, "symlink loop")
        elif is_image_file(child):
            images.append(child)
        elif child.is_dir():
            log.warning("ignoring nested folder %s (images must sit directly in the group folder)", shown(child))
        elif child.suffix.lower() in OTHER_PHOTO_EXTENSIONS:
            log.warning(
                "ignoring %s: a photo format this pipeline does not read (%s); its ticket is judged without it "
                "unless it is converted",
                shown(child),
                "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS)),
            )
        else:
            log.debug("ignoring non-image file %s", child)
    return sorted(images, key=lambda p: natural_sort_key(p.name))


def scan_tree(root: str | Path, strict: bool = True, missions: Iterable[str] = MISSIONS) -> ScanResult:
    """Scan ``root`` into sorted :class:`GroupRecord` s (mission order of ``missions``, label, group id).

    Raises :class:`DataError` naming the path for a missing root, an unknown mission folder, a mixed
    labelled/unlabelled mission folder or an empty group when ``strict``; otherwise such folders are
    skipped whole, logged and returned in ``ScanResult.skipped``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder")
    mission_order = {name: i for i, name in enumerate(missions)}
    result = ScanResult()
    # (mission, label, group_id) -> [(folder, images)]
    groups: dict[tuple[str, str | None, str], list[tuple[Path, list[Path]]]] = {}
    for mission_dir in _subdirs(root, result, strict):
        if mission_dir.name not in mission_order:
            _reject(result, strict, mission_dir, f"unknown mission folder (known: {list(mission_order)})")
            continue
        for label, group_dir in _group_dirs(mission_dir, strict, result):
            images = list_group_images(group_dir, result.skipped)
            bad_names = [p for p in images if not is_utf8_name(p)]
            if bad_names:
                _reject(result, strict, group_dir, f"image name not valid UTF-8: {shown(bad_names[0].name)}")
                continue
            if not images:
                _reject(result, strict, group_dir, "empty group: no image files")
                continue
            group_id = extract_group_id(group_dir.name, images[0].name)
            groups.setdefault((mission_dir.name, label, group_id), []).append((group_dir, images))
    result.records = [_merge(key, folders) for key, folders in groups.items()]
    result.records.sort(key=lambda r: _record_order(r, mission_order))
    _log_summary(root, result)
    return result


def _group_dirs(mission_dir: Path, strict: bool, result: ScanResult) -> list[tuple[str | None, Path]]:
    """``(label, group folder)`` pairs of one mission folder, labelled or not (see module docstring)."""
    children = _subdirs(mission_dir, result, strict)
    label_dirs = [d for d in children if d.name in LABEL_DIRS]
    others = [d for d in children if d.name not in LABEL_DIRS]
    _warn_loose_images(mission_dir)
    if not label_dirs:
        return [(None, d) for d in others]
    for other in others:
        _reject(
            result,
            strict,
            other,
            f"mission folder {mission_dir} mixes label folders ({', '.join(d.name for d in label_dirs)}) "
            "with group folders; put every group under a label folder, or use no label folders",
        )
    pairs = []
    for label_dir in label_dirs:
        _warn_loose_images(label_dir)
        pairs.extend((LABEL_DIRS[label_dir.name], d) for d in _subdirs(label_dir, result, strict))
    return pairs


def _merge(key: tuple[str, str | None, str], folders: list[tuple[Path, list[Path]]]) -> GroupRecord:
    """One record from the folders of one (mission, label, id): folders in name order."""
    mission, label, group_id = key
    folders = sorted(folders, key=lambda f: (natural_sort_key(f[0].name), str(f[0])))
    if len(folders) > 1:
        log.info("group %s: merging folders %s", group_id, [f[0].name for f in folders])
    return GroupRecord(
        group_id=group_id,
        ticket_key=ticket_key(group_id, label),
        mission=mission,
        label=label,
        image_paths=tuple(p for _, images in folders for p in images),
        folders=tuple(str(folder) for folder, _ in folders),
    )


def _record_order(record: GroupRecord, mission_order: dict[str, int]) -> tuple[object, ...]:
    label_rank = LABELS.index(record.label) if record.label in LABELS else len(LABELS)
    return mission_order[record.mission], label_rank, natural_sort_key(record.group_id)


def _reject(result: ScanResult, strict: bool, path: Path, reason: str) -> None:
    """Strict: raise naming ``path``. Non-strict: record and log the skip."""
    if strict:
        raise DataError(f"{shown(path)}: {reason} (set data.strict=false to skip such folders)")
    _note(result.skipped, path, reason)


def _note(skipped: list[SkippedGroup] | None, path: Path, reason: str) -> None:
    """Log a path left out and list it (whatever ``strict`` says: it is not the user's data)."""
    log.warning("skipping %s: %s", shown(path), reason)
    if skipped is not None:
        skipped.append(SkippedGroup(path=path, reason=reason))


def _subdirs(folder: Path, result: ScanResult, strict: bool) -> list[Path]:
    """Visible sub-folders in name order; files at this level are ignored.

    Hidden folders and symlink loops are noted; a folder name that is not UTF-8 is rejected.
    """
    folders = []
    for child in folder.iterdir():
        if is_symlink_loop(child):
            _note(result.skipped, child, "symlink loop")
        elif not child.is_dir():
            continue
        elif _hidden(child):
            _note(result.skipped, child, "hidden folder (name starts with '.')")
        elif not is_utf8_name(child):
            _reject(result, strict, child, "folder name not valid UTF-8")
        else:
            folders.append(child)
    return sorted(folders, key=lambda p: p.name)


def _warn_loose_images(folder: Path) -> None:
    """Images where group folders are expected are not read: say so rather than drop them silently."""
    loose = [p.name for p in folder.iterdir() if is_image_file(p)]
    if loose:
        log.warning(
            "ignoring %d image(s) directly in %s (not in a group folder): %s",
            len(loose),
            shown(folder),
            [shown(name) for name in loose[:5]],
        )


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _log_summary(root: Path, result: ScanResult) -> None:
    images = sum(len(r.image_paths) for r in result.records)
    log.info(
        "scanned %s: %d groups, %d images, %d skipped folders",
        root,
        len(result.records),
        images,
        len(result.skipped),
    )
