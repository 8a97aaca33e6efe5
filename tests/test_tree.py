"""SPEC §3 input tree: group ids, merging, labels, ordering, bad input (strict / skip) and image loading."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from bbuqc_lightning.constants import LABEL_DIR_NAMES, MISSIONS
from bbuqc_lightning.data.images import ImageError, load_image, target_size, validate_group_images
from bbuqc_lightning.data.tree import DataError, GroupRecord, extract_group_id, natural_sort_key, scan_tree

M_INSTALL, M_GROUND, M_CABLE, M_BAFFLE = MISSIONS
PASS_DIR, FAIL_DIR = LABEL_DIR_NAMES["pass"], LABEL_DIR_NAMES["fail"]
GID = "QC-TEMP-20250118-0015123"


def write_image(
    path: Path, size: tuple[int, int] = (8, 6), color: tuple[int, int, int] = (200, 10, 10)
) -> Path:
    """A tiny real image; the format follows the extension (case-insensitive)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}[
        path.suffix.lower()
    ]
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def group(root: Path, *parts: str, images: tuple[str, ...] = ("a.jpg",)) -> Path:
    folder = root.joinpath(*parts)
    folder.mkdir(parents=True, exist_ok=True)
    for name in images:
        write_image(folder / name)
    return folder


def names(record: GroupRecord) -> list[str]:
    return [p.name for p in record.image_paths]


# ------------------------------------------------------------------ group ids


@pytest.mark.parametrize(
    ("folder", "first_image", "expected"),
    [
        (GID, "IMG_01.jpg", GID),
        (f"{GID}-补拍", "IMG_01.jpg", GID),
        ("QC-temp-20250118-7", None, "QC-temp-20250118-7"),
        ("站点照片", "QC-TEMP-20241206-0015502_4348975.jpeg", "QC-TEMP-20241206-0015502"),
        ("站点照片", "IMG_01.jpg", "站点照片"),
        ("站点照片", None, "站点照片"),
        ("xQC-TEMP-20250118-1", "QC-TEMP-2025011-1.jpg", "xQC-TEMP-20250118-1"),  # anchored, 8 digits
    ],
)
def test_extract_group_id(folder: str, first_image: str | None, expected: str) -> None:
    assert extract_group_id(folder, first_image) == expected


def test_natural_sort_orders_numbers_by_value() -> None:
    files = ["img10.jpg", "img2.jpg", "IMG1.jpg", "img2b.jpg"]
    assert sorted(files, key=natural_sort_key) == ["IMG1.jpg", "img2.jpg", "img2b.jpg", "img10.jpg"]


# ------------------------------------------------------------------ layout, merging, ordering


def test_merge_folders_of_one_id_and_natural_sort(tmp_path: Path) -> None:
    group(tmp_path, M_BAFFLE, FAIL_DIR, f"{GID}-补拍", images=("img10.jpg", "img2.jpg"))
    group(tmp_path, M_BAFFLE, FAIL_DIR, GID, images=("img10.jpg", "img2.jpg", "img1.JPG"))
    (records,) = [scan_tree(tmp_path).records]
    assert len(records) == 1
    rec = records[0]
    assert (rec.group_id, rec.ticket_key, rec.mission, rec.label) == (GID, f"{GID}::fail", M_BAFFLE, "fail")
    assert [Path(f).name for f in rec.folders] == [GID, f"{GID}-补拍"]
    assert names(rec) == ["img1.JPG", "img2.jpg", "img10.jpg", "img2.jpg", "img10.jpg"]
    assert rec.image_paths[3].parent.name == f"{GID}-补拍"


def test_id_from_first_image_merges_differently_named_folders(tmp_path: Path) -> None:
    group(tmp_path, M_CABLE, PASS_DIR, "b-second", images=(f"{GID}_2.jpg",))
    group(tmp_path, M_CABLE, PASS_DIR, "a-first", images=(f"{GID}_1.jpg",))
    group(tmp_path, M_CABLE, PASS_DIR, "no-id-here", images=("IMG_1.jpg",))
    records = scan_tree(tmp_path).records
    assert [r.group_id for r in records] == ["no-id-here", GID]  # natural, case-insensitive id order
    assert names(records[1]) == [f"{GID}_1.jpg", f"{GID}_2.jpg"]


def test_same_id_under_both_labels_is_two_records(tmp_path: Path) -> None:
    group(tmp_path, M_GROUND, PASS_DIR, GID)
    group(tmp_path, M_GROUND, FAIL_DIR, f"{GID}-补拍")
    records = scan_tree(tmp_path).records
    assert [(r.group_id, r.label) for r in records] == [(GID, "pass"), (GID, "fail")]
    assert [r.ticket_key for r in records] == [f"{GID}::pass", f"{GID}::fail"]


def test_label_aliases_merge_with_chinese_label_dirs(tmp_path: Path) -> None:
    group(tmp_path, M_INSTALL, "pass", GID, images=("b.png",))
    group(tmp_path, M_INSTALL, PASS_DIR, f"{GID}-补拍", images=("a.png",))
    group(tmp_path, M_INSTALL, "fail", "QC-A-20250101-9")
    records = scan_tree(tmp_path).records
    assert [(r.ticket_key, len(r.image_paths)) for r in records] == [
        (f"{GID}::pass", 2),
        ("QC-A-20250101-9::fail", 1),
    ]


def test_unlabelled_tree(tmp_path: Path) -> None:
    group(tmp_path, M_BAFFLE, GID)
    (rec,) = scan_tree(tmp_path).records
    assert rec.label is None
    assert rec.ticket_key == f"{GID}::unlabeled"


def test_records_sorted_by_mission_order_label_and_id(tmp_path: Path) -> None:
    group(tmp_path, M_BAFFLE, PASS_DIR, "QC-A-20250101-10")
    group(tmp_path, M_BAFFLE, PASS_DIR, "QC-A-20250101-9")
    group(tmp_path, M_BAFFLE, FAIL_DIR, "QC-A-20250101-1")
    group(tmp_path, M_INSTALL, FAIL_DIR, "QC-A-20250101-5")
    keys = [(r.mission, r.ticket_key) for r in scan_tree(tmp_path).records]
    assert keys == [
        (M_INSTALL, "QC-A-20250101-5::fail"),
        (M_BAFFLE, "QC-A-20250101-9::pass"),
        (M_BAFFLE, "QC-A-20250101-10::pass"),
        (M_BAFFLE, "QC-A-20250101-1::fail"),
    ]


def test_extensions_case_insensitive_and_other_files_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = group(tmp_path, M_CABLE, PASS_DIR, GID, images=("1.JPG", "2.jpeg", "3.Png", "4.webp", "5.BMP"))
    (folder / "notes.txt").write_text("not an image")
    (folder / "raw.tiff").write_bytes(b"II*\x00")
    (folder / "IMG_6.HEIC").write_bytes(b"\x00")
    (folder / ".DS_Store").write_bytes(b"\x00")
    write_image(folder / ".hidden.jpg")
    (tmp_path / ".DS_Store").write_bytes(b"\x00")
    (tmp_path / M_CABLE / PASS_DIR / ".DS_Store").write_bytes(b"\x00")
    with caplog.at_level("WARNING", logger="bbuqc_lightning.data.tree"):
        (rec,) = scan_tree(tmp_path).records
    assert names(rec) == ["1.JPG", "2.jpeg", "3.Png", "4.webp", "5.BMP"]
    # a photo in a format not read is left out loudly (its ticket is judged without it), a text file quietly
    warned = [r.getMessage() for r in caplog.records]
    assert sum("IMG_6.HEIC" in m or "raw.tiff" in m for m in warned) == 2
    assert not any("notes.txt" in m for m in warned)
    for path in rec.image_paths:
        assert load_image(path, 16, 10_000).mode == "RGB"


# ------------------------------------------------------------------ bad input: strict vs skip


def test_unknown_mission_strict_and_skipped(tmp_path: Path) -> None:
    group(tmp_path, M_BAFFLE, PASS_DIR, GID)
    group(tmp_path, "挡风板检查(旧)", PASS_DIR, GID)
    with pytest.raises(DataError, match=r"挡风板检查\(旧\).*unknown mission"):
        scan_tree(tmp_path)
    result = scan_tree(tmp_path, strict=False)
    assert [r.ticket_key for r in result.records] == [f"{GID}::pass"]
    assert [s.path.name for s in result.skipped] == ["挡风板检查(旧)"]


def test_empty_group_strict_and_skipped(tmp_path: Path) -> None:
    group(tmp_path, M_BAFFLE, PASS_DIR, GID)
    empty = group(tmp_path, M_BAFFLE, PASS_DIR, "QC-A-20250101-2", images=())
    (empty / "readme.txt").write_text("no photos")
    with pytest.raises(DataError, match=r"QC-A-20250101-2.*empty group"):
        scan_tree(tmp_path)
    result = scan_tree(tmp_path, strict=False)
    assert len(result.records) == 1
    assert [(s.path, s.reason) for s in result.skipped] == [(empty, "empty group: no image files")]


def test_mixed_label_and_group_folders(tmp_path: Path) -> None:
    group(tmp_path, M_BAFFLE, PASS_DIR, GID)
    group(tmp_path, M_BAFFLE, "QC-A-20250101-3")
    with pytest.raises(DataError, match="mixes label folders"):
        scan_tree(tmp_path)
    result = scan_tree(tmp_path, strict=False)
    assert [r.ticket_key for r in result.records] == [f"{GID}::pass"]
    assert [s.path.name for s in result.skipped] == ["QC-A-20250101-3"]


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope"):
        scan_tree(tmp_path / "nope")


def test_corrupt_image_strict_and_skip(tmp_path: Path) -> None:
    group(tmp_path, M_BAFFLE, PASS_DIR, "QC-A-20250101-1")
    bad_group = group(tmp_path, M_BAFFLE, PASS_DIR, "QC-A-20250101-2", images=("a.jpg",))
    garbage = bad_group / "b.jpg"
    garbage.write_bytes(b"definitely not a jpeg")
    records = scan_tree(tmp_path).records
    with pytest.raises(ImageError, match=r"QC-A-20250101-2::pass.*b\.jpg"):
        validate_group_images(records[1], 16, 10_000)
    # What the DataModule does with strict=false: skip the whole group, named and counted.
    kept, skipped = [], []
    for rec in records:
        try:
            validate_group_images(rec, 16, 10_000)
            kept.append(rec.ticket_key)
        except ImageError as err:
            skipped.append(str(err))
    assert kept == ["QC-A-20250101-1::pass"]
    assert len(skipped) == 1 and str(garbage) in skipped[0]


def test_truncated_jpeg_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.jpg"
    Image.effect_noise((64, 64), 50).convert("RGB").save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"t\.jpg"):
        load_image(path, 16, 10_000)
    with pytest.raises(ImageError, match=r"missing\.jpg"):
        load_image(tmp_path / "missing.jpg", 16, 10_000)


# ------------------------------------------------------------------ image loading


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    loaded = load_image(path, 16, 100_000)
    assert loaded.size == (20, 40)
    assert loaded.getpixel((10, 5))[0] > 200  # stored left half ends up on top after rotating CW


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width x height`` but carries no pixel data: only a bomb check can stop it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, then ours refuses
@pytest.mark.parametrize("size", [(20_000, 5_000), (100_000, 100_000)])
def test_decompression_bomb_refused_before_decoding(tmp_path: Path, size: tuple[int, int]) -> None:
    path = _png_header_only(tmp_path / "bomb.png", *size)
    with pytest.raises(ImageError, match=r"bomb\.png"):
        load_image(path, 16, 10_000)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # global PIL state untouched


def test_bomb_limit_is_a_parameter(tmp_path: Path) -> None:
    path = write_image(tmp_path / "big.png", size=(100, 100))
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(path, 16, 100_000, max_image_pixels=5_000)
    assert load_image(path, 16, 100_000).size == (100, 100)


def test_resize_within_pixel_window(tmp_path: Path) -> None:
    big = load_image(write_image(tmp_path / "big.jpg", size=(400, 300)), 1_000, 10_000)
    assert big.width * big.height <= 10_000 and big.width * big.height > 9_000
    assert abs(big.width / big.height - 4 / 3) < 0.05
    small = load_image(write_image(tmp_path / "small.png", size=(10, 5)), 4_096, 100_000)
    assert small.width * small.height >= 4_096 and abs(small.width / small.height - 2) < 0.05
    inside = load_image(write_image(tmp_path / "ok.webp", size=(50, 40)), 16, 10_000)
    assert inside.size == (50, 40)


@pytest.mark.parametrize(
    ("size", "window"),
    [((4000, 3000), (4096, 786432)), ((1, 100_000), (16, 65_536)), ((3, 3), (100, 110)), ((7, 1), (64, 64))],
)
def test_target_size_stays_in_window(size: tuple[int, int], window: tuple[int, int]) -> None:
    w, h = target_size(*size, *window)
    assert w >= 1 and h >= 1 and w * h <= window[1]


def test_transparent_png_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "shot.png"
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(path)
    img = load_image(path, 16, 10_000)
    assert img.mode == "RGB" and img.getpixel((5, 5)) == (255, 255, 255)
