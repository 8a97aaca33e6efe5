"""The synthetic data set: SPEC §2 rules, §4 summary grammar, §3 layout, determinism, CLI."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
from pathlib import Path

import pytest
from PIL import Image

from bbuqc_lightning.constants import (
    GROUP_ID_PATTERN,
    IMAGE_EXTENSIONS,
    LABEL_DIRS,
    MISSIONS,
    SLUG_TO_MISSION,
)
from bbuqc_lightning.data.synthetic import tree as synthetic_tree
from bbuqc_lightning.data.synthetic.render import render_image
from bbuqc_lightning.data.synthetic.scenes import (
    ImageScene,
    SceneObject,
    Vocab,
    generate_group,
    judge_group,
    parse_summary,
)
from bbuqc_lightning.data.synthetic.tree import ensure_synthetic, generate_synthetic

INSTALL, GROUND, CABLING, BAFFLE = (SLUG_TO_MISSION[s] for s in MISSIONS.values())
SIZE = (40, 30)
GROUPS = {"train": 8, "val": 2, "test": 2}

# ------------------------------------------------------------------ hand-written rule cases (SPEC §2)
BBU_OK = "BBU设备/华为,显示完整×1"
MOUNT_OK = "螺丝、光纤插头/BBU安装螺丝,显示完整,符合要求×3"
CAB_OK = "螺丝、光纤插头/机柜处接地螺丝,显示完整,符合要求×1"
BAR_OK = "螺丝、光纤插头/地排处接地螺丝,显示完整,符合要求×2"
TIDY = "电线/捆扎整齐×2"
PLUGS_OK = (
    "螺丝、光纤插头/BBU端光纤插头,显示完整,符合要求×2，螺丝、光纤插头/ODF端光纤插头,显示完整,符合要求×2"
)
FIBRE_OK = "光纤/有保护措施,弯曲半径合理/蛇形管×2"
NEEDS_FITTED = "BBU设备/中兴,显示完整,机柜空间充足需要安装/这个BBU设备按要求配备了挡风板×1"
BAFFLE_OK = "挡风板/中兴,显示完整,安装方向正确×1"

RULE_CASES = [
    # BBU安装方式检查（正装）: a complete BBU and compliant mounting screws
    (INSTALL, [BBU_OK, MOUNT_OK], "pass"),
    (INSTALL, [f"{BBU_OK}，{MOUNT_OK}", "标签/无法识别×2", "无关图片"], "pass"),  # labels: not this mission
    *[
        (INSTALL, [BBU_OK, f"螺丝、光纤插头/BBU安装螺丝,显示完整,不符合要求/{d}×2"], "fail")
        for d in Vocab.DEFECTS
    ],
    (INSTALL, ["BBU设备/华为,只显示部分×1", MOUNT_OK], "fail"),
    (INSTALL, [BBU_OK, MOUNT_OK, "螺丝、光纤插头/BBU安装螺丝,只显示部分,符合要求×1"], "fail"),
    (INSTALL, [MOUNT_OK, "标签/可以识别×2"], "fail"),  # no BBU seen
    (INSTALL, [BBU_OK, "无关图片"], "fail"),  # no screws seen
    *[(INSTALL, [BBU_OK, f"{MOUNT_OK}，备注: 螺丝{w}"], "fail") for w in ("无法判断", "模糊", "被遮挡")],
    (INSTALL, [BBU_OK, f"{MOUNT_OK}，备注: 拍摄角度为正面"], "pass"),  # a neutral remark
    # BBU接地线检查: both grounding screws compliant, wires bundled
    (GROUND, [CAB_OK, f"{BAR_OK}，{TIDY}"], "pass"),
    (GROUND, [CAB_OK, TIDY], "fail"),
    (GROUND, [BAR_OK, TIDY], "fail"),
    (GROUND, ["螺丝、光纤插头/机柜处接地螺丝,显示完整,不符合要求/生锈×1", BAR_OK, TIDY], "fail"),
    (GROUND, [CAB_OK, "螺丝、光纤插头/地排处接地螺丝,显示完整,不符合要求/复接×1", TIDY], "fail"),
    (GROUND, [CAB_OK, BAR_OK, "电线/分布散乱×2"], "fail"),
    (GROUND, [CAB_OK, BAR_OK], "fail"),  # wires not seen
    (GROUND, ["螺丝、光纤插头/机柜处接地螺丝,只显示部分,符合要求×1", BAR_OK, TIDY], "fail"),
    (GROUND, [CAB_OK, BAR_OK, f"{TIDY}，备注: 地排处接地螺丝被遮挡"], "fail"),
    # BBU线缆布放要求: both connectors compliant, fibre protected with a reasonable bend, labels readable
    (CABLING, [PLUGS_OK, FIBRE_OK], "pass"),
    (CABLING, [PLUGS_OK, "光纤/有保护措施,弯曲半径合理/铠装×1，标签/可以识别×4"], "pass"),
    (CABLING, [PLUGS_OK, "光纤/无保护措施,弯曲半径合理×1"], "fail"),
    (CABLING, [PLUGS_OK, "光纤/有保护措施,弯曲半径不合理/蛇形管×1"], "fail"),
    (CABLING, [PLUGS_OK, FIBRE_OK, "光纤/无保护措施,弯曲半径不合理×1"], "fail"),
    (CABLING, ["螺丝、光纤插头/BBU端光纤插头,显示完整,符合要求×2", FIBRE_OK], "fail"),
    (
        CABLING,
        [
            PLUGS_OK.replace("ODF端光纤插头,显示完整,符合要求", "ODF端光纤插头,显示完整,不符合要求/未拧紧"),
            FIBRE_OK,
        ],
        "fail",
    ),
    (CABLING, [PLUGS_OK], "fail"),  # fibre not seen
    (CABLING, [PLUGS_OK, FIBRE_OK, "标签/无法识别×1"], "fail"),
    (CABLING, [PLUGS_OK, f"{FIBRE_OK}，备注: 光纤弯曲处被遮挡无法判断弯曲半径"], "fail"),
    # 挡风板安装检查: a needed baffle is fitted the right way; 无需安装 lets the other points decide
    (BAFFLE, [NEEDS_FITTED, BAFFLE_OK], "pass"),
    (BAFFLE, ["BBU设备/华为,显示完整,无需安装×1"], "pass"),
    (BAFFLE, ["BBU设备/华为,只显示部分,无需安装×1"], "fail"),
    (BAFFLE, ["BBU设备/华为,显示完整,机柜空间充足需要安装/这个BBU设备未按要求配备挡风板×1"], "fail"),
    (BAFFLE, [NEEDS_FITTED, "挡风板/中兴,显示完整,安装方向错误×1"], "fail"),
    (BAFFLE, [NEEDS_FITTED, "挡风板/中兴,只显示部分,安装方向正确×1"], "fail"),
    (BAFFLE, [NEEDS_FITTED], "fail"),  # baffle said to be fitted but never seen
    (BAFFLE, [BBU_OK], "fail"),  # whether a baffle is needed is unknown
    (BAFFLE, [NEEDS_FITTED, f"{BAFFLE_OK}，备注: 无法判断是否有足够空间安装挡风板"], "fail"),
    *[(mission, ["无关图片", "无关图片"], "fail") for mission in MISSIONS],
]


@pytest.mark.parametrize(("mission", "summaries", "expected"), RULE_CASES)
def test_rules(mission: str, summaries: list[str], expected: str) -> None:
    assert judge_group(mission, summaries) == expected


# ------------------------------------------------------------------ summary grammar (SPEC §4)
_ATOM = r"[^/，×,\n]+"
_OBJECT = re.compile(rf"{_ATOM}/{_ATOM}(?:,{_ATOM})*(?:/{_ATOM}(?:,{_ATOM})*)?×[1-9][0-9]*")
_KINDS = {Vocab.BBU, Vocab.BAFFLE, Vocab.PART, Vocab.FIBRE, Vocab.WIRE, Vocab.LABEL}


def assert_grammar(summary: str) -> None:
    assert summary and "\n" not in summary
    if summary == "无关图片":
        return
    body, separator, remark = summary.partition("，备注: ")
    assert not separator or remark.strip()
    for item in body.split("，"):
        assert _OBJECT.fullmatch(item), (item, summary)
        assert item.split("/")[0] in _KINDS, item


@pytest.mark.parametrize("bad", ["", "a\nb", "BBU设备/华为", "BBU设备/华为×0", "备注: 只有备注", "BBU设备×1"])
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_summary(bad)


def test_generated_groups_follow_rules_and_grammar() -> None:
    """Many random groups: each target is met, every summary parses and round-trips through the model."""
    for seed in range(60):
        for mission in MISSIONS:
            for target in ("pass", "fail"):
                group = generate_group(mission, target, random.Random(seed))
                assert group.label == target == judge_group(mission, group.summaries())
                assert 2 <= len(group.images) <= 6
                for image, summary in zip(group.images, group.summaries(), strict=True):
                    assert_grammar(summary)
                    objects, remark = parse_summary(summary)
                    assert ImageScene(tuple(objects), remark) == image


# ------------------------------------------------------------------ the data set on disk (SPEC §3)
def _natural(name: str) -> list[int | str]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name.lower())]


def _scan(split_root: Path) -> dict[str, list[str]]:
    """An independent SPEC §3 scanner: ticket_key -> image names (folders by name, natural sort inside)."""
    tickets: dict[str, list[str]] = {}
    for mission_dir in split_root.iterdir():
        assert mission_dir.name in MISSIONS
        for label_dir in mission_dir.iterdir():
            label = LABEL_DIRS[label_dir.name]
            for folder in sorted(label_dir.iterdir(), key=lambda p: _natural(p.name)):
                names = sorted((f.name for f in folder.iterdir()), key=_natural)
                match = GROUP_ID_PATTERN.match(folder.name) or GROUP_ID_PATTERN.match(names[0])
                assert match, folder
                tickets.setdefault(f"{match.group(1)}::{label}", []).extend(names)
    return tickets


def _tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("syn") / "synthetic"
    return out, generate_synthetic(out, seed=0, groups_per_split=GROUPS, image_size=SIZE)


def _records(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"stage_a_{split}.jsonl").read_text("utf-8").splitlines()]


def test_layout_records_and_labels(dataset: tuple[Path, dict]) -> None:
    out, manifest = dataset
    assert json.loads((out / "manifest.json").read_text("utf-8")) == manifest
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", *GROUPS, *(f"stage_a_{s}.jsonl" for s in GROUPS)]
    )
    all_ids: set[str] = set()
    for split, n in GROUPS.items():
        records = _records(out, split)
        assert len(records) == n * len(MISSIONS) == manifest["splits"][split]["groups"]
        ids = [r["group_id"] for r in records]
        assert len(set(ids)) == len(ids) and not all_ids & set(ids)
        all_ids |= set(ids)
        for mission in MISSIONS:
            assert {r["label"] for r in records if r["mission"] == mission} == {"pass", "fail"}
        scanned = _scan(out / split)
        assert set(scanned) == {r["ticket_key"] for r in records}
        for r in records:
            assert list(r) == ["group_id", "ticket_key", "mission", "label", "images", "per_image"]
            assert re.fullmatch(r"QC-TEMP-2025[0-9]{4}-00[0-9]{5}", r["group_id"])
            assert r["ticket_key"] == f"{r['group_id']}::{r['label']}"
            assert r["images"] == scanned[r["ticket_key"]]  # the tree scanner's merged order
            assert list(r["per_image"]) == [f"图片_{i}" for i in range(1, len(r["images"]) + 1)]
            assert 2 <= len(r["images"]) <= 6
            assert all(Path(name).suffix.lower() in IMAGE_EXTENSIONS for name in r["images"])
            for summary in r["per_image"].values():
                assert_grammar(summary)
            assert judge_group(r["mission"], list(r["per_image"].values())) == r["label"]


def test_tree_has_the_quirks_of_field_data(dataset: tuple[Path, dict]) -> None:
    """Suffixed folders, tickets split over two folders, id-less folders, natural-sort-sensitive names."""
    out, _ = dataset
    folders = [p for p in out.glob("*/*/*/*") if p.is_dir()]
    suffixed = [f for f in folders if (m := GROUP_ID_PATTERN.match(f.name)) and m.group(1) != f.name]
    assert suffixed
    assert any(not GROUP_ID_PATTERN.match(f.name) for f in folders)
    assert any(
        (f.parent / GROUP_ID_PATTERN.match(f.name).group(1)).is_dir() for f in suffixed
    )  # split tickets
    names = [p.name for p in out.rglob("*") if p.is_file() and p.parent in folders]
    assert {Path(n).suffix for n in names} >= {".jpg", ".png", ".JPG", ".jpeg"}
    assert any(re.fullmatch(r"IMG_1[0-2]\..+", n) for n in names)  # IMG_10 must sort after IMG_2
    merged = [r for s in GROUPS for r in _records(out, s) if sorted(r["images"], key=_natural) != r["images"]]
    assert merged  # a merged ticket whose order is folder order, not one global natural sort


def test_images_have_the_requested_size_and_clean_encoding(dataset: tuple[Path, dict]) -> None:
    out, manifest = dataset
    assert manifest["image_size"] == list(SIZE)
    files = [p for p in (out / "val").rglob("*") if p.is_file()]
    assert len(files) == manifest["splits"]["val"]["images"]
    for path in files:
        with Image.open(path) as image:
            assert image.size == SIZE
            assert image.format == ("PNG" if path.suffix.lower() == ".png" else "JPEG")
            assert not image.getexif()


def test_deterministic_per_seed(tmp_path: Path) -> None:
    runs = (("a", 7), ("b", 7), ("c", 8))
    for name, seed in runs:
        generate_synthetic(tmp_path / name, seed, {"train": 2, "val": 1}, (24, 16))
    hashes = [_tree_hash(tmp_path / name) for name, _ in runs]
    assert hashes[0] == hashes[1] != hashes[2]
    assert (tmp_path / "a" / "stage_a_val.jsonl").read_bytes() == (
        tmp_path / "b" / "stage_a_val.jsonl"
    ).read_bytes()


def test_ensure_generates_once_and_survives_interruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, kwargs = tmp_path / "syn", {"groups_per_split": {"val": 1}, "image_size": (16, 16)}
    calls = iter(range(100))
    real = synthetic_tree.render_image

    def flaky(*args: object, **kw: object) -> Image.Image:
        if next(calls) == 3:
            raise KeyboardInterrupt  # an interrupted run
        return real(*args, **kw)

    monkeypatch.setattr(synthetic_tree, "render_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(out, **kwargs)
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing that looks complete, no debris
    assert ensure_synthetic(out, **kwargs) == out
    stamp = (out / "manifest.json").stat().st_mtime_ns
    (out / "val" / "marker").write_text("kept")
    ensure_synthetic(out, **kwargs)
    assert (out / "val" / "marker").exists() and (out / "manifest.json").stat().st_mtime_ns == stamp
    generate_synthetic(out, **kwargs)  # an explicit generate replaces an earlier generated tree
    assert not (out / "val" / "marker").exists()
    foreign = tmp_path / "foreign"
    (foreign / "x").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        ensure_synthetic(foreign, **kwargs)
    assert (foreign / "x").is_dir()


# ------------------------------------------------------------------ rendering
P = Vocab.PART
FLIPS = [
    (SceneObject(P, (Vocab.MOUNT_SCREW, Vocab.COMPLETE, Vocab.OK), (), 2), ("未拧紧",)),
    (SceneObject(P, (Vocab.BAR_SCREW, Vocab.COMPLETE, Vocab.OK), (), 2), ("生锈",)),
    (SceneObject(Vocab.BAFFLE, ("华为", Vocab.COMPLETE, Vocab.DIR_OK)), (Vocab.DIR_OK, Vocab.DIR_BAD)),
    (
        SceneObject(Vocab.FIBRE, (Vocab.PROTECTED, Vocab.RADIUS_OK), ("蛇形管",)),
        (Vocab.RADIUS_OK, Vocab.RADIUS_BAD),
    ),
    (SceneObject(Vocab.LABEL, (Vocab.READABLE,), (), 3), (Vocab.READABLE, Vocab.UNREADABLE)),
    (SceneObject(Vocab.WIRE, (Vocab.TIDY,), (), 2), (Vocab.TIDY, Vocab.MESSY)),
    (SceneObject(Vocab.BBU, ("中兴", Vocab.COMPLETE)), (Vocab.COMPLETE, Vocab.PARTIAL)),
]


@pytest.mark.parametrize(("good", "flip"), FLIPS)
def test_defects_are_visible(good: SceneObject, flip: tuple[str, ...]) -> None:
    """A defect changes the pixels; the same scene and seed give the same pixels."""
    if len(flip) == 1:  # a non-compliant part with this defect
        bad = SceneObject(good.kind, (*good.attrs[:2], Vocab.NOT_OK), flip, good.count)
    else:
        bad = SceneObject(
            good.kind, tuple(flip[1] if a == flip[0] else a for a in good.attrs), (), good.count
        )
    ok_image = render_image(ImageScene((good,)), (96, 72), seed=1)
    assert ok_image.tobytes() == render_image(ImageScene((good,)), (96, 72), seed=1).tobytes()
    assert ok_image.tobytes() != render_image(ImageScene((bad,)), (96, 72), seed=1).tobytes()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).resolve().parents[1] / "tools" / "make_synthetic.py"
    spec = importlib.util.spec_from_file_location("make_synthetic", path)
    assert spec and spec.loader
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["--out", str(tmp_path / "d"), "--seed", "2", "--train", "1", "--val", "0", "--test", "1"]
    assert cli.main([*argv, "--width", "33", "--height", "21"]) == 0
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text("utf-8"))
    assert manifest["image_size"] == [33, 21] and manifest["groups_per_split"] == {
        "train": 1,
        "val": 0,
        "test": 1,
    }
    assert len(_records(tmp_path / "d", "test")) == len(MISSIONS)
    image = next(p for p in (tmp_path / "d" / "train").rglob("*") if p.is_file())
    assert Image.open(image).size == (33, 21)
    assert "train" in capsys.readouterr().out
