"""Stage-A output (SPEC §4): record schema and alignment, crash-safe JSONL, resume, kill -9, DDP shards."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from bbuqc_lightning.callbacks.stage_a_writer import (
    StageAJsonlWriter,
    completed_ticket_keys,
    list_shards,
    shard_path,
)
from bbuqc_lightning.constants import MISSIONS
from bbuqc_lightning.data.jsonl import (
    JsonlAppender,
    JsonlError,
    atomic_write_jsonl,
    dumps_line,
    iter_jsonl,
    read_jsonl,
    read_jsonl_keys,
    repair_jsonl,
)
from bbuqc_lightning.data.tree import GroupRecord
from bbuqc_lightning.summaries.records import build_stage_a_record, check_stage_a_line, clean_summary

REPO = Path(__file__).resolve().parents[1]
MISSION = next(iter(MISSIONS))


def make_record(i: int) -> GroupRecord:
    """Group ``i``: 1-3 fake image paths (the writer never opens them); labels alternate."""
    group_id = f"QC-T-20250101-{i}"
    label = ("pass", "fail", None)[i % 3]
    paths = tuple(Path(f"/data/{group_id}/img{k}.jpg") for k in range(1, 2 + (i + 1) % 3))
    key = f"{group_id}::{label or 'unlabeled'}"
    return GroupRecord(group_id, key, MISSION, label, paths, (f"/data/{group_id}",))


def fake_summary(record: GroupRecord, index: int, tag: str = "") -> str:
    return f"标签/可以识别×{index + 1}，备注: {record.group_id}{tag}"


def group_line(i: int) -> dict[str, Any]:
    rec = make_record(i)
    return build_stage_a_record(rec, [fake_summary(rec, k) for k in range(len(rec.image_paths))])


def lines_of(path: Path) -> list[dict[str, Any]]:
    """Every line of ``path``, which must all be complete and valid SPEC §4 objects."""
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), "torn tail left in the file"
    rows = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
    for row in rows:
        check_stage_a_line(row)
    return rows


def assert_each_once(path: Path, n: int) -> list[dict[str, Any]]:
    rows = lines_of(path)
    keys = [row["ticket_key"] for row in rows]
    assert len(keys) == len(set(keys)), "a group was written twice"
    assert set(keys) == {make_record(i).ticket_key for i in range(n)}
    return rows


# ------------------------------------------------------------------ records


def test_record_schema() -> None:
    rec = make_record(1)  # 3 images, label fail
    line = build_stage_a_record(rec, ["a×1", "无关图片", "b×2"])
    assert list(line) == ["group_id", "ticket_key", "mission", "label", "images", "per_image"]
    assert line["ticket_key"] == "QC-T-20250101-1::fail" and line["label"] == "fail"
    assert line["images"] == ["img1.jpg", "img2.jpg", "img3.jpg"]
    assert line["per_image"] == {"图片_1": "a×1", "图片_2": "无关图片", "图片_3": "b×2"}
    check_stage_a_line(line)
    unlabelled = build_stage_a_record(make_record(2), ["x"])
    assert unlabelled["label"] is None and json.loads(dumps_line(unlabelled))["label"] is None


@pytest.mark.parametrize(
    ("summaries", "match"),
    [
        (["a", "b"], r"QC-T-20250101-1::fail: 3 images but 2 summaries"),
        (["a", "b", "c", "d"], "3 images but 4 summaries"),
        (["a", "  ", "c"], r"QC-T-20250101-1::fail, 图片_2 \(.*img2\.jpg\): empty summary"),
        (["a", "b", "c\nd"], r"图片_3 .*not a single line"),
        (["a", "b\r", "c"], "not a single line"),
        (["a", None, "c"], "must be a string"),
    ],
)
def test_alignment_errors_name_the_group(summaries: list[Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_stage_a_record(make_record(1), summaries)


def test_check_stage_a_line_rejects_misaligned_keys() -> None:
    line = group_line(1)
    line["per_image"] = {"图片_1": "a", "图片_3": "b", "图片_2": "c"}
    with pytest.raises(ValueError, match="per_image keys"):
        check_stage_a_line(line)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  无关图片 \n", "无关图片"),
        ("<think>\n看图\n</think>\n\n标签/可以识别×2", "标签/可以识别×2"),
        ("看图……</think>标签/可以识别×2", "标签/可以识别×2"),
        ("<think>没有想完", ""),
        (
            "标签/可以识别×2，\n光纤/有保护措施×1\n\n电线/捆扎整齐×1",
            "标签/可以识别×2，光纤/有保护措施×1，电线/捆扎整齐×1",
        ),
        ("a×1\r\nb×2", "a×1，b×2"),
        ("\n \n", ""),
    ],
)
def test_clean_summary(raw: str, clean: str) -> None:
    assert clean_summary(raw) == clean


# ------------------------------------------------------------------ JSONL primitives


def test_repair_cuts_only_the_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    assert repair_jsonl(path) == 0  # missing file is fine
    with JsonlAppender(path) as out:
        out.append(group_line(0))
        out.append(group_line(1))
    whole = path.read_bytes()
    assert "图片_1".encode() in whole  # ensure_ascii=False: readable UTF-8
    torn = dumps_line(group_line(2))[:-7]
    path.write_bytes(whole + torn)
    assert read_jsonl_keys(path, "ticket_key") == {make_record(0).ticket_key, make_record(1).ticket_key}
    assert repair_jsonl(path) == len(torn)
    assert path.read_bytes() == whole
    path.write_bytes(b"no newline at all")
    assert repair_jsonl(path) == 17 and path.read_bytes() == b""


def test_invalid_complete_line_is_a_located_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(dumps_line(group_line(0)) + b"{not json\n" + dumps_line(group_line(1)))
    with pytest.raises(JsonlError, match=r"bad\.jsonl:2"):
        read_jsonl(path)
    path.write_bytes(b'{"a": 1}\n')
    with pytest.raises(JsonlError, match="no 'ticket_key'"):
        read_jsonl_keys(path, "ticket_key")


def test_appender_repairs_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.jsonl"
    path.parent.mkdir()
    path.write_bytes(dumps_line(group_line(0)) + b'{"ticket_key": "QC-T-2025')
    with JsonlAppender(path, fsync=False) as out:
        out.append(group_line(1))
    assert [r["ticket_key"] for r in iter_jsonl(path)] == [
        make_record(0).ticket_key,
        make_record(1).ticket_key,
    ]


# ------------------------------------------------------------------ kill -9 (real subprocesses)

# The scripts are self-contained (no import of this module, which imports Lightning: ~10 s per process).
LINE_SRC = """
import sys, time
from pathlib import Path
from bbuqc_lightning.constants import MISSIONS, ticket_key
from bbuqc_lightning.data.tree import GroupRecord
from bbuqc_lightning.summaries.records import build_stage_a_record

def line(i):
    gid, label = f"QC-K-20250101-{i}", ("pass", "fail")[i % 2]
    paths = tuple(Path(f"/d/{gid}/{k}.jpg") for k in range(1 + i % 3))
    rec = GroupRecord(gid, ticket_key(gid, label), next(iter(MISSIONS)), label, paths, (f"/d/{gid}",))
    return build_stage_a_record(rec, [f"标签/可以识别×{k + 1}" for k in range(len(paths))])
"""

APPEND_SCRIPT = (
    LINE_SRC
    + """
from bbuqc_lightning.data.jsonl import JsonlAppender, dumps_line, read_jsonl_keys
path, n, delay, tear_at = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
done = read_jsonl_keys(path, "ticket_key")  # resume: skip what is written
with JsonlAppender(path) as out:
    for i in range(n):
        row = line(i)
        if row["ticket_key"] in done:
            continue
        if i == tear_at:  # simulate a kill in the middle of a line: half a line, then wait to be killed
            out._file.write(dumps_line(row)[:25])
            time.sleep(60)
        out.append(row)
        time.sleep(delay)
"""
)


def run_appender(path: Path, n: int, delay: float = 0.0, tear_at: int = -1) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-c", APPEND_SCRIPT, str(path), str(n), str(delay), str(tear_at)]
    return subprocess.Popen(args, cwd=REPO)


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the subprocess"
        time.sleep(0.005)


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("mode", ["at_random", "mid_line"])
def test_kill_9_then_rerun_completes(tmp_path: Path, mode: str) -> None:
    n = 30
    reference = tmp_path / "reference.jsonl"
    assert run_appender(reference, n).wait(timeout=60) == 0
    expected = lines_of(reference)
    assert len({row["ticket_key"] for row in expected}) == n

    path = tmp_path / "killed.jsonl"
    if mode == "mid_line":
        proc = run_appender(path, n, tear_at=7)
        wait_for(lambda: complete_lines(path) == 7 and not path.read_bytes().endswith(b"\n"))
    else:
        proc = run_appender(path, n, delay=0.02)
        wait_for(lambda: complete_lines(path) >= 5)
        time.sleep(0.013)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert 0 < complete_lines(path) < n
    assert read_jsonl_keys(path, "ticket_key")  # complete lines readable as they are, torn tail or not

    assert run_appender(path, n).wait(timeout=60) == 0
    assert lines_of(path) == expected  # every line valid, same groups, none lost, none doubled
    assert path.read_bytes() == reference.read_bytes()


ATOMIC_SCRIPT = (
    LINE_SRC
    + """
from bbuqc_lightning.data.jsonl import atomic_write_jsonl
def rows():
    for i in range(1000):
        yield line(i)
        time.sleep(0.01)
atomic_write_jsonl(sys.argv[1], rows())
"""
)


def test_atomic_write_survives_kill(tmp_path: Path) -> None:
    path = tmp_path / "distill.jsonl"
    atomic_write_jsonl(path, [group_line(0), group_line(1)])
    old = path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", ATOMIC_SCRIPT, str(path)], cwd=REPO)
    wait_for(lambda: any(p.name.endswith(".tmp") for p in tmp_path.iterdir()))
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert path.read_bytes() == old
    assert atomic_write_jsonl(path, [group_line(5)]) == 1
    assert [r["ticket_key"] for r in read_jsonl(path)] == [make_record(5).ticket_key]


# ------------------------------------------------------------------ the writer callback


def predict_output(metas: list[dict[str, Any]], tag: str = "") -> dict[str, list[Any]]:
    """What the Stage-A LightningModule's ``predict_step`` returns for ``batch["meta"]``."""
    return {
        "ticket_key": [m["ticket_key"] for m in metas],
        "image_index": [m["image_index"] for m in metas],
        "summary": [fake_summary(m["record"], m["image_index"], tag) for m in metas],
    }


def metas_of(records: list[GroupRecord]) -> list[dict[str, Any]]:
    """The DataModule's per-image ``meta`` dicts, group after group, image after image."""
    return [
        {"ticket_key": r.ticket_key, "image_index": k, "num_images": len(r.image_paths), "record": r}
        for r in records
        for k in range(len(r.image_paths))
    ]


def test_writer_without_trainer_writes_complete_groups(tmp_path: Path) -> None:
    out = tmp_path / "stage_a.jsonl"
    writer = StageAJsonlWriter(str(out), fsync=False)
    metas = metas_of([make_record(i) for i in range(4)])
    for start in range(0, len(metas), 3):  # batches cut groups in the middle
        batch = {"meta": metas[start : start + 3]}
        writer.write_on_batch_end(None, None, predict_output(batch["meta"]), None, batch, start // 3)  # type: ignore[arg-type]
    assert_each_once(out, 4)
    assert (writer.groups_written, writer.images_written) == (4, len(metas))
    bad = {"meta": metas[:2]}
    swapped = predict_output(list(reversed(bad["meta"])))
    with pytest.raises(ValueError, match="does not match batch"):
        writer.write_on_batch_end(None, None, swapped, None, bad, 0)  # type: ignore[arg-type]


class MetaDataModule(L.LightningDataModule):
    """The Stage-A DataModule's contract without images: whole groups per rank, resume skip set."""

    def __init__(self, records: list[GroupRecord], batch_size: int = 3) -> None:
        super().__init__()
        self.records = records
        self.batch_size = batch_size
        self.skip_ticket_keys: set[str] = set()
        self.items: list[dict[str, Any]] = []

    def setup(self, stage: str) -> None:
        mine = self.records[self.trainer.global_rank :: self.trainer.world_size]
        self.items = metas_of([r for r in mine if r.ticket_key not in self.skip_ticket_keys])

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.items, batch_size=self.batch_size, collate_fn=lambda items: {"meta": list(items)}
        )


class FixedSummaries(L.LightningModule):
    """Stands in for the VLM: summaries derived from the metadata (and the rank, to see who wrote what)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Linear(1, 1)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, list[Any]]:
        return predict_output(batch["meta"], tag=f"@rank{self.trainer.global_rank}")


def predict(writer: StageAJsonlWriter, dm: MetaDataModule, **trainer_kwargs: Any) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[writer],
        **{"devices": 1, **trainer_kwargs},
    )
    trainer.predict(FixedSummaries(), datamodule=dm, return_predictions=False)


@pytest.mark.parametrize("wired", [True, False])
def test_resume_skips_written_groups_and_repairs_tail(tmp_path: Path, wired: bool) -> None:
    n = 7
    out = tmp_path / "stage_a.jsonl"
    out.write_bytes(dumps_line(group_line(0)) + dumps_line(group_line(3)) + dumps_line(group_line(4))[:30])
    writer = StageAJsonlWriter(str(out), fsync=False)
    assert writer.completed_ticket_keys == {make_record(0).ticket_key, make_record(3).ticket_key}
    dm = MetaDataModule([make_record(i) for i in range(n)])
    if wired:  # what the stage_a entry point does; unwired, the writer still refuses duplicates
        dm.skip_ticket_keys = set(writer.completed_ticket_keys)
    predict(writer, dm)
    assert_each_once(out, n)
    assert writer.groups_written == n - 2 and writer.groups_resumed == 2
    assert writer.groups_already_written == (0 if wired else 2)


def test_incomplete_group_is_an_error_not_a_silent_drop(tmp_path: Path) -> None:
    class HalfGroups(MetaDataModule):
        def setup(self, stage: str) -> None:
            super().setup(stage)
            self.items = [
                m for m in self.items if not (m["ticket_key"].endswith("::fail") and m["image_index"])
            ]

    out = tmp_path / "stage_a.jsonl"
    with pytest.raises(RuntimeError, match=r"QC-T-20250101-1::fail.*1/3"):
        predict(StageAJsonlWriter(str(out), fsync=False), HalfGroups([make_record(i) for i in range(3)]))
    assert [r["ticket_key"] for r in lines_of(out)] == [make_record(0).ticket_key, make_record(2).ticket_key]


def test_limited_predict_loop_warns_and_rerun_completes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``limit_predict_batches`` (debug=limit) may cut a group: warned and left for the next run, no error."""
    n, out = 5, tmp_path / "stage_a.jsonl"
    records = [make_record(i) for i in range(n)]  # 2, 3, 1, 2, 3 images; batches of 3 cut group 1
    predict(StageAJsonlWriter(str(out), fsync=False), MetaDataModule(records), limit_predict_batches=1)
    assert [r["ticket_key"] for r in lines_of(out)] == [records[0].ticket_key]
    assert "QC-T-20250101-1::fail" in caplog.text and "limited" in caplog.text
    writer = StageAJsonlWriter(str(out), fsync=False)
    dm = MetaDataModule(records)
    dm.skip_ticket_keys = set(writer.completed_ticket_keys)
    predict(writer, dm)
    assert_each_once(out, n)


@pytest.mark.parametrize(
    "strategy",
    # fork: fast (no re-import). spawn: fresh interpreters as on a real multi-GPU run (~20 s: slow).
    ["ddp_fork", pytest.param("ddp_spawn", marks=pytest.mark.slow)],
)
def test_ddp_two_processes_merge_into_one_file(tmp_path: Path, strategy: str) -> None:
    """2 CPU ranks (gloo): each writes its shard, rank 0 merges; leftovers of a killed run count."""
    n = 9
    out = tmp_path / "stage_a.jsonl"
    out.write_bytes(dumps_line(group_line(0)) + b'{"group_id": "QC-T-2025')  # killed mid-line
    shard_path(out, 3).write_bytes(dumps_line(group_line(5)) + b"{")  # from an earlier 4-rank run
    shard_path(out, 0).write_bytes(dumps_line(group_line(1)))
    writer = StageAJsonlWriter(str(out), fsync=False)
    assert (
        writer.completed_ticket_keys
        == completed_ticket_keys(out)
        == {make_record(i).ticket_key for i in (0, 1, 5)}
    )
    dm = MetaDataModule([make_record(i) for i in range(n)], batch_size=2)
    dm.skip_ticket_keys = set(writer.completed_ticket_keys)
    predict(writer, dm, devices=2, strategy=strategy)
    rows = assert_each_once(out, n)
    assert list_shards(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["stage_a.jsonl"]
    writers = {
        row["per_image"]["图片_1"].rsplit("@", 1)[-1] for row in rows if "@" in row["per_image"]["图片_1"]
    }
    assert writers == {"rank0", "rank1"}  # both ranks really wrote groups
    assert [row["ticket_key"] for row in rows[:1]] == [make_record(0).ticket_key]  # old lines stay first
