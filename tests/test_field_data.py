"""Field data that must never block a job: names that are not UTF-8, hidden folders, symlink loops.

A photo archive made on Windows often holds GBK-encoded names, which the file system hands to Python as
surrogate escapes; such a name cannot be written to the UTF-8 JSONL. Each case is either a located error
(``strict``) or a logged, counted skip that leaves every good group in the result.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from PIL import Image

from bbuqc_lightning.constants import LABEL_DIR_NAMES, MISSIONS
from bbuqc_lightning.data.jsonl import dumps_line
from bbuqc_lightning.data.tree import DataError, scan_tree
from bbuqc_lightning.summaries.records import build_stage_a_record
from bbuqc_lightning.train import train

PASS_DIR = LABEL_DIR_NAMES["pass"]
MISSION = next(iter(MISSIONS))
BAD = b"\xc3\x28"  # not UTF-8 (a GBK byte pair would do the same)


def write_group(folder: Path, *names: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = os.path.join(os.fsencode(folder), name if isinstance(name, bytes) else os.fsencode(name))
        Image.new("RGB", (8, 6)).save(os.fsdecode(path), format="JPEG")
    return folder


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Three good groups of one mission; tests add one bad entry that sorts first."""
    for i in (1, 2, 3):
        write_group(tmp_path / MISSION / PASS_DIR / f"QC-TEMP-20250101-000000{i}", "IMG_1.jpg")
    return tmp_path


def labelled(tree: Path) -> Path:
    return tree / MISSION / PASS_DIR


def assert_good_groups_written(tree: Path, strict: bool = False) -> list:
    scan = scan_tree(tree, strict=strict)
    assert [r.group_id for r in scan.records] == [f"QC-TEMP-20250101-000000{i}" for i in (1, 2, 3)]
    for record in scan.records:  # every line the Stage-A writer would write encodes
        dumps_line(build_stage_a_record(record, ["电线/捆扎整齐×1"] * len(record.image_paths)))
    return scan.skipped


def test_image_name_not_utf8_is_a_located_error_or_a_counted_skip(
    tree: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_group(labelled(tree) / "QC-TEMP-20250101-0000000", b"IMG_" + BAD + b".jpg")
    with pytest.raises(
        DataError, match=r"QC-TEMP-20250101-0000000: image name not valid UTF-8: IMG_\\xc3\(\.jpg"
    ):
        scan_tree(tree, strict=True)
    with caplog.at_level(logging.WARNING):
        skipped = assert_good_groups_written(tree)
    assert [(s.path.name, s.reason) for s in skipped] == [
        ("QC-TEMP-20250101-0000000", "image name not valid UTF-8: IMG_\\xc3(.jpg")
    ]
    assert "skipping" in caplog.text and "QC-TEMP-20250101-0000000" in caplog.text


def test_folder_name_not_utf8_is_a_located_error_or_a_counted_skip(tree: Path) -> None:
    os.mkdir(os.fsencode(labelled(tree)) + b"/QC-" + BAD)
    write_group(Path(os.fsdecode(os.fsencode(labelled(tree)) + b"/QC-" + BAD)), "IMG_1.jpg")
    with pytest.raises(DataError, match=r"QC-\\xc3\(: folder name not valid UTF-8") as err:
        scan_tree(tree, strict=True)
    str(err.value).encode("utf-8")  # the message itself prints anywhere
    skipped = assert_good_groups_written(tree)
    assert [s.reason for s in skipped] == ["folder name not valid UTF-8"]


def test_hidden_folders_and_symlink_loops_are_logged_and_counted(
    tree: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_group(labelled(tree) / ".QC-TEMP-20250101-0000009", "IMG_1.jpg")
    (labelled(tree) / "QC-TEMP-20250101-0000008").symlink_to(labelled(tree) / "QC-TEMP-20250101-0000008")
    (labelled(tree) / "QC-TEMP-20250101-0000001" / "IMG_0.jpg").symlink_to("IMG_0.jpg")
    with caplog.at_level(logging.WARNING):
        skipped = assert_good_groups_written(tree, strict=True)  # not the user's data: no error
    reasons = {s.path.name: s.reason for s in skipped}
    assert reasons == {
        ".QC-TEMP-20250101-0000009": "hidden folder (name starts with '.')",
        "QC-TEMP-20250101-0000008": "symlink loop",
        "IMG_0.jpg": "symlink loop",
    }
    assert caplog.text.count("skipping") == 3


def test_stage_a_run_writes_every_good_ticket_when_a_bad_name_sorts_first(
    tree: Path, compose: Callable[[list[str]], DictConfig], tmp_path: Path
) -> None:
    """The field report: the bad ticket sorted first blocked the whole job (0 of 3 good tickets written)."""
    write_group(labelled(tree) / "QC-TEMP-20250101-0000000", b"IMG_" + BAD + b".jpg")
    out = tmp_path / "stage_a.jsonl"
    cfg = compose(["+experiment=stage_a", "logger=none", f"data.root={tree}", "data.strict=false",
                   f"stage_a.output_jsonl={out}", "module.max_new_tokens=2", "trainer.enable_progress_bar=false"])  # fmt: skip
    try:
        metrics, _ = train(cfg)
    finally:
        HydraConfig.instance().cfg = None
    rows = [json.loads(line) for line in out.read_bytes().decode("utf-8").splitlines()]  # valid UTF-8
    assert [r["group_id"] for r in rows] == [f"QC-TEMP-20250101-000000{i}" for i in (1, 2, 3)]
    assert metrics["stage_a/skipped_groups"] == 1
