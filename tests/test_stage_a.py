"""Stage-A end to end (SPEC §3–§4) on the tiny random Qwen3-VL and a tiny synthetic tree.

What the writer- and scanner-level tests (``test_stage_a_writer.py``, ``test_tree.py``) cannot show:
batched greedy generation equals batch-1 generation when a batch mixes image sizes; ``train(cfg)`` writes
the SPEC §4 JSONL in the scanner's order with the right metrics; a run killed with ``kill -9`` resumes
without loss, duplicates or regeneration; SIGTERM finishes the batch in hand and exits 143; a corrupt image
is a logged skip (``data.strict=false``) or one located error (``data.strict=true``); DDP over 2 CPU ranks
merges its shards into one file, also when a resumed run leaves a rank (or every rank) nothing to generate.

Every run here shares one tiny synthetic tree and one uninterrupted reference run (module fixtures). The
default run kills a forked ``train(cfg)`` and stops runs by signals and errors in this process; ``-m slow``
does the same through real ``python -m bbuqc_lightning.train`` processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import exit_code_of_train
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from bbuqc_lightning.callbacks.stage_a_writer import StageAJsonlWriter, list_shards, shard_path
from bbuqc_lightning.config import config_dir
from bbuqc_lightning.constants import LABEL_DIR_NAMES, MISSIONS, image_key
from bbuqc_lightning.data.jsonl import dumps_line
from bbuqc_lightning.data.synthetic.tree import ensure_synthetic
from bbuqc_lightning.data.tree import GroupRecord, scan_tree
from bbuqc_lightning.models.factory import load_model
from bbuqc_lightning.stage_a.datamodule import StageADataModule
from bbuqc_lightning.stage_a.module import StageAModule
from bbuqc_lightning.stage_a.settings import settings_path
from bbuqc_lightning.summaries.records import STAGE_A_FIELDS
from bbuqc_lightning.train import train

# Tiny synthetic data: 1 group per mission in the test split. Seed 16 gives small groups (2+2+3+2 = 9
# images of 64x48, one group merged from two folders): each decode step of the HF backend costs ~0.1 s on
# a busy CPU, most of it in transformers' SuppressTokensLogitsProcessor (torch.isin over the vocabulary).
SYNTHETIC_SEED = 16
GROUPS_PER_SPLIT = {"train": 0, "val": 0, "test": 1}
IMAGE_SIZE = (64, 48)
MAX_NEW_TOKENS = 8
BATCH_SIZE = 3
TORN_TAIL = b'{"group_id": "QC-TEMP-2025'  # what a kill in the middle of a write leaves behind

ComposeAt = Callable[[list[str], Path, Path], DictConfig]


# ------------------------------------------------------------------ helpers


def overrides_for(root: Path, *extra: str) -> list[str]:
    """The Stage-A command line shared by the in-process runs and the CLI subprocesses."""
    return [
        "+experiment=stage_a",
        "logger=none",
        f"data.root={root}",
        f"data.batch_size={BATCH_SIZE}",
        f"module.max_new_tokens={MAX_NEW_TOKENS}",
        "extras.print_config=false",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


def run_in_process(compose_at: ComposeAt, overrides: list[str], run_root: Path, data_dir: Path) -> dict:
    """``train(cfg)`` exactly as the CLI calls it; returns the metrics.json it wrote."""
    cfg = compose_at(overrides, run_root, data_dir)
    try:
        train(cfg)
    finally:
        HydraConfig.instance().cfg = None
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text(encoding="utf-8"))


def jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """Every line of ``path``: all complete (no torn tail) and valid JSON objects."""
    raw = path.read_bytes()
    assert raw.endswith(b"\n"), f"{path}: empty or torn tail"
    rows = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
    assert all(isinstance(row, dict) for row in rows)
    return rows


def by_ticket(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    keys = [row["ticket_key"] for row in rows]
    assert len(keys) == len(set(keys)), f"duplicate ticket_keys: {keys}"
    return {row["ticket_key"]: row for row in rows}


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def cli_env(root_dir: Path, data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "PROJECT_ROOT": str(root_dir), "BBUQC_DATA_DIR": str(data_dir)}
    env.update(OMP_NUM_THREADS="2", WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def cli_args(overrides: list[str], run_dir: Path) -> list[str]:
    """``python -m bbuqc_lightning.train <overrides>`` with a known run folder (for its metrics.json)."""
    return [sys.executable, "-m", "bbuqc_lightning.train", *overrides, f"hydra.run.dir={run_dir}"]


def run_cli(overrides: list[str], run_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_args(overrides, run_dir), cwd=env["PROJECT_ROOT"], env=env, capture_output=True, timeout=180
    )


def record_images(records: list[GroupRecord]) -> int:
    return sum(len(r.image_paths) for r in records)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def stage_a_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``paths.data_dir`` of these tests, holding the tiny synthetic tree under ``synthetic/``."""
    data_dir = tmp_path_factory.mktemp("stage_a_data")
    ensure_synthetic(
        data_dir / "synthetic",
        seed=SYNTHETIC_SEED,
        groups_per_split=GROUPS_PER_SPLIT,
        image_size=IMAGE_SIZE,
    )
    return data_dir


@pytest.fixture(scope="module")
def tree_root(stage_a_data: Path) -> Path:
    return stage_a_data / "synthetic" / "test"


@pytest.fixture(scope="module")
def records(tree_root: Path) -> list[GroupRecord]:
    recs = scan_tree(tree_root).records
    assert len(recs) == len(MISSIONS) and record_images(recs) == 9
    assert any(len(r.folders) > 1 for r in recs)  # a 补拍 folder merged into its group
    return recs


@pytest.fixture(scope="module")
def reference(
    compose_at: ComposeAt, stage_a_data: Path, tree_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[dict[str, Any]], dict, Path]:
    """One uninterrupted in-process run (CSV logger): ``(rows, metrics, run root)``.

    Without the ``wandb`` package importable: a CSV run must not need it (a GPU image without wandb once
    failed at the very end, after writing every line, on the W&B sample table).
    """
    root = tmp_path_factory.mktemp("reference")
    out = root / "stage_a.jsonl"
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
        metrics = run_in_process(
            compose_at,
            overrides_for(tree_root, "logger=csv", f"stage_a.output_jsonl={out}"),
            root,
            stage_a_data,
        )
    return jsonl_rows(out), metrics, root


# ------------------------------------------------------------------ 1. batched == batch-1


def _varied_tree(src: list[GroupRecord], dst: Path) -> Path:
    """Two groups (two missions, so two prompt lengths) of 2 images, each of its own size and shape."""
    sizes = [(160, 40), (48, 144), (256, 64), (72, 72)]  # 5, 6, 16 and 4 image tokens after merging
    paths = [p for r in src for p in r.image_paths][: len(sizes)]
    for g, mission in enumerate(list(MISSIONS)[:2]):
        folder = dst / mission / LABEL_DIR_NAMES["pass"] / f"QC-TEMP-20250101-000000{g + 1}"
        folder.mkdir(parents=True)
        for k in range(2):
            with Image.open(paths[2 * g + k]) as img:
                img.convert("RGB").resize(sizes[2 * g + k]).save(folder / f"IMG_{k + 1}.png")
    return dst


def test_batched_greedy_equals_batch_of_one(
    tiny_architecture: dict[str, Any], records: list[GroupRecord], tmp_path: Path
) -> None:
    """Left padding: one batch of 4 images with different image-token counts (and two prompts) decodes
    exactly like 4 batches of 1, through the DataModule and ``StageAModule.predict_step``; so does a batch
    whose prompts a DataLoader worker encoded (the DataModule given the processor, as ``train`` gives it),
    whole or loaded in units of 2 and re-batched (``data.load_batch_size``), and batches of 1 each handing the
    next one's prompts to the engine early (``data.lookahead``) or not."""
    # A larger initializer_range makes the random model's output depend on its input (0.02: near-constant).
    arch = {**tiny_architecture, "text": {**tiny_architecture["text"], "initializer_range": 0.3}}
    bundle = load_model(kind="vl", random_init=True, architecture=arch, seed=0, max_pixels=65536)
    module = StageAModule(bundle, max_new_tokens=MAX_NEW_TOKENS)
    prompts = OmegaConf.to_container(OmegaConf.load(config_dir() / "prompts" / "stage_a.yaml"))
    root = _varied_tree(records, tmp_path / "tree")
    image_pad = bundle.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def summaries(batch_size: int, **kw: Any) -> tuple[dict[tuple[str, int], str], list[list[int]]]:
        dm = StageADataModule(str(root), prompts, batch_size=batch_size, max_pixels=65536, **kw)
        dm.setup("predict")
        out, image_tokens = {}, []
        loader = dm.predict_dataloader()
        assert len(loader) == -(-4 // batch_size)
        for i, batch in enumerate(loader):
            assert ("prompt" in batch) == ("processor" in kw) != ("image" in batch)  # the photo travels once
            lookahead = "prompt" in batch and kw.get("lookahead", True) and i < len(loader) - 1
            assert ("ahead" in batch) == lookahead  # the next batch's prompts, handed to the engine early
            assert (
                len(batch["meta"])
                == len(batch["conversation"])
                == (batch_size if i < len(loader) - 1 else 4 - i * batch_size)
            )
            if "prompt" in batch:
                ids = [p["input_ids"][0] for p in batch["prompt"]]
            else:
                ids = list(
                    module.engine.encode(batch["conversation"], [[im] for im in batch["image"]]).input_ids
                )
            image_tokens.append([int((row == image_pad).sum()) for row in ids])
            pred = module.predict_step(batch, i)
            keys = zip(pred["ticket_key"], pred["image_index"], strict=True)
            out.update(zip(keys, pred["summary"], strict=True))
        return out, image_tokens

    module.on_predict_epoch_start()
    one, _ = summaries(1)
    # the loop's time outside generation is accounted (logged at the end of a run): first batch, then the gaps
    assert module.loop_seconds["first_batch"] > 0 and module.loop_seconds["between_batches"] > 0
    four, image_tokens = summaries(4)
    assert len(image_tokens) == 1 and len(set(image_tokens[0])) == 4, image_tokens  # padding differs
    assert len(one) == 4 and len(set(one.values())) > 1, one  # output depends on the image: a real check
    assert four == one
    encoded_in_worker, _ = summaries(4, processor=bundle.processor, num_workers=1)
    assert encoded_in_worker == one
    prompts_before = module.engine.stats["prompts"]
    handed_ahead, _ = summaries(1, processor=bundle.processor, num_workers=1)  # data.lookahead (default)
    assert handed_ahead == one and module.engine.stats["prompts"] - prompts_before == 4  # each prompt once
    assert summaries(1, processor=bundle.processor, num_workers=1, lookahead=False)[0] == one
    module._samples.clear()  # the W&B table's photos: loaded again from their files when the batch has none
    rebatched, tokens = summaries(4, processor=bundle.processor, num_workers=1, load_batch_size=2)
    assert rebatched == one and tokens == image_tokens  # same batches, same order
    assert len(module._samples) == 4 and all(
        img.width * img.height <= 512 * 384 for img, _, _ in module._samples
    )
    assert module.engine.stats["encode_seconds"] > 0  # the other runs encoded inside the engine


# ------------------------------------------------------------------ 2. train(cfg) end to end


def test_train_writes_spec_jsonl(
    reference: tuple[list[dict[str, Any]], dict, Path], records: list[GroupRecord]
) -> None:
    rows, metrics, root = reference
    assert [row["ticket_key"] for row in rows] == [r.ticket_key for r in records]  # one line per group
    for row, rec in zip(rows, records, strict=True):
        assert list(row) == list(STAGE_A_FIELDS)
        assert (row["group_id"], row["mission"], row["label"]) == (rec.group_id, rec.mission, rec.label)
        assert row["ticket_key"] == f"{rec.group_id}::{rec.label}"
        assert row["images"] == [p.name for p in rec.image_paths]  # the scanner's (natural) order
        assert list(row["per_image"]) == [image_key(i) for i in range(1, len(rec.image_paths) + 1)]
        for summary in row["per_image"].values():
            assert isinstance(summary, str) and summary.strip() == summary and summary
            assert "\n" not in summary and "\r" not in summary
    assert metrics["stage_a/images"] == record_images(records)
    assert metrics["stage_a/groups"] == len(records) and metrics["stage_a/skipped_groups"] == 0
    csv_metrics = (root / "run" / "csv" / "metrics.csv").read_text(encoding="utf-8")
    assert "stage_a/images" in csv_metrics


def test_lookahead_writes_the_lines_of_batches_generated_alone(
    compose_at: ComposeAt,
    stage_a_data: Path,
    tree_root: Path,
    tmp_path: Path,
    reference: tuple[list[dict[str, Any]], dict, Path],
) -> None:
    """With prompts encoded in a worker, each predict batch hands the next one's to the engine (``data.lookahead``,
    the default): the same lines, in the same order, as batches generated alone, and as the reference run; so
    does chunked prefill (``generation.prefill_chunk_tokens``), prompts entering the pool inside decode steps."""
    rows = {}
    variants = {
        "true": ("data.lookahead=true",),
        "false": ("data.lookahead=false",),
        "chunked": ("data.lookahead=true", "generation.prefill_chunk_tokens=24"),
    }
    for name, settings in variants.items():
        out = tmp_path / name / "stage_a.jsonl"
        extra = (f"stage_a.output_jsonl={out}", "data.num_workers=1", *settings)
        metrics = run_in_process(compose_at, overrides_for(tree_root, *extra), tmp_path / name, stage_a_data)
        rows[name] = jsonl_rows(out)
        assert metrics["stage_a/images"] == 9
    assert rows["true"] == rows["false"] == rows["chunked"] == reference[0]


def test_images_match_the_synthetic_reference_order(
    reference: tuple[list[dict[str, Any]], dict, Path], stage_a_data: Path
) -> None:
    """The generator's own reference JSONL lists each group's images in 图片_i order: same as ours."""
    truth = by_ticket(jsonl_rows(stage_a_data / "synthetic" / "stage_a_test.jsonl"))
    ours = by_ticket(reference[0])
    assert set(ours) == set(truth)
    for key, row in ours.items():
        assert row["images"] == truth[key]["images"]
        assert list(row["per_image"]) == list(truth[key]["per_image"])


# ------------------------------------------------------------------ 3 + 5. kill -9 and resume (real CLI)


def _run_until_killed(
    compose_at: ComposeAt, overrides: list[str], run_root: Path, data_dir: Path, out: Path
) -> None:
    """A forked child's work: ``train(cfg)``, which stops in its tracks once a line of ``out`` is durable,
    to wait there for its ``kill -9`` (so the kill always lands mid-run, however slow the machine)."""
    os.setsid()  # its own process group, as a run started from a shell
    # One intra-op thread, as Lightning gives each forked DDP rank here: the OpenMP pool this process
    # inherited from its parent has no threads behind it, and a parallel region would wait for them forever.
    torch.set_num_threads(1)
    write = StageAJsonlWriter.write_on_batch_end

    def write_then_wait(self: StageAJsonlWriter, *args: Any, **kwargs: Any) -> None:
        write(self, *args, **kwargs)
        while complete_lines(out) >= 1:
            signal.pause()

    StageAJsonlWriter.write_on_batch_end = write_then_wait  # type: ignore[method-assign]
    run_in_process(compose_at, overrides, run_root, data_dir)


@pytest.fixture(
    scope="module",
    # fork: a child of this process runs train(cfg) (what the command line runs), rerun here; cli: a real
    # `python -m bbuqc_lightning.train`, rerun by another (two interpreters' imports: slow).
    params=["fork", pytest.param("cli", marks=pytest.mark.slow)],
)
def killed_then_resumed(
    request: pytest.FixtureRequest,
    compose_at: ComposeAt,
    stage_a_data: Path,
    tree_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """A run, ``kill -9`` of its process group after the first line(s), a torn line added, a rerun."""
    root = tmp_path_factory.mktemp("killed")
    out = root / "stage_a.jsonl"
    env = cli_env(root, stage_a_data)
    overrides = overrides_for(tree_root, f"stage_a.output_jsonl={out}")
    total = len(scan_tree(tree_root).records)
    err = root / "run1.stderr"
    with open(err, "wb") as stderr:  # a file, not a pipe: a full pipe would stall the run
        if request.param == "cli":
            proc: Any = (
                subprocess.Popen(  # its own process group: kill -9 takes every process of the run at once
                    cli_args(overrides, root / "run1"),
                    cwd=root,
                    env=env,
                    start_new_session=True,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            )
            alive, wait = (lambda: proc.poll() is None), (lambda: proc.wait(timeout=30))
        else:
            args = (compose_at, overrides, root / "run1", stage_a_data, out)
            proc = multiprocessing.get_context("fork").Process(target=_run_until_killed, args=args)
            proc.start()
            alive = proc.is_alive

            def wait() -> int | None:
                proc.join(timeout=30)
                return proc.exitcode

        try:
            deadline = time.monotonic() + 120  # a hung run fails here instead of hanging the suite
            while complete_lines(out) < 1 and alive():
                assert time.monotonic() < deadline, "no Stage-A line within 120 s"
                time.sleep(0.01)
        finally:  # also when the wait above fails: never leave the run behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):  # a child killed before its setsid()
                os.kill(proc.pid, signal.SIGKILL)
            rc = wait()
    tail = err.read_text(encoding="utf-8", errors="replace")[-3000:]
    assert rc == -signal.SIGKILL, f"the run ended before it was killed (rc={rc}):\n{tail}"
    before = jsonl_rows(out)
    assert 1 <= len(before) < total, f"killed too late: {len(before)}/{total} lines written"
    with open(out, "ab") as f:  # a kill in the middle of the next line's write
        f.write(TORN_TAIL)

    if request.param == "cli":
        resumed = run_cli(overrides, root / "run2", env)
        assert resumed.returncode == 0, resumed.stderr.decode("utf-8", "replace")[-3000:]
        metrics = json.loads((root / "run2" / "metrics.json").read_text(encoding="utf-8"))
    else:
        metrics = run_in_process(compose_at, overrides, root / "rerun", stage_a_data)
    return {"before": before, "after": jsonl_rows(out), "metrics": metrics, "out": out}


def test_kill_9_then_resume_equals_uninterrupted_run(
    killed_then_resumed: dict[str, Any], reference: tuple[list[dict[str, Any]], dict, Path]
) -> None:
    before, after = killed_then_resumed["before"], killed_then_resumed["after"]
    expected = by_ticket(reference[0])
    got = by_ticket(after)  # every line valid JSON, no duplicate ticket_key
    assert set(got) == set(expected)  # none lost
    assert got == expected  # greedy decoding: the same summaries whether killed or not
    assert after[: len(before)] == before  # lines written before the kill are kept as they were


def test_signal_finishes_the_batch_in_hand_and_exits_128_plus_signal(
    compose_at: ComposeAt, stage_a_data: Path, tree_root: Path, tmp_path: Path,
    reference: tuple[list[dict[str, Any]], dict, Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """SIGTERM arrives while the first batch is generated (sent by this process to itself, as a scheduler
    would): that batch is finished and written, the run stops before the next one with exit code 143 and
    ``metrics.json``, and a rerun completes the file as an uninterrupted run wrote it. The same through the
    real command line, signalled from outside: ``test_signal_..._through_the_cli`` (slow)."""
    out = tmp_path / "stage_a.jsonl"
    overrides = overrides_for(tree_root, f"stage_a.output_jsonl={out}")
    predict_step = StageAModule.predict_step

    def signalled_step(self: StageAModule, batch: dict[str, list], batch_idx: int) -> dict[str, list]:
        if batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return predict_step(self, batch, batch_idx)

    monkeypatch.setattr(StageAModule, "predict_step", signalled_step)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    handler = signal.getsignal(signal.SIGTERM)
    cfg = compose_at(overrides, tmp_path / "stopped", stage_a_data)
    code = exit_code_of_train(cfg)
    assert code == 128 + signal.SIGTERM
    assert "error: stopped on SIGTERM" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == handler  # the run gave the previous handler back
    before = jsonl_rows(out)  # every line whole
    assert 1 <= len(before) < len(reference[0])
    assert (tmp_path / "stopped" / "run" / "metrics.json").is_file()  # written on the way out
    monkeypatch.setattr(StageAModule, "predict_step", predict_step)
    run_in_process(compose_at, overrides, tmp_path / "rerun", stage_a_data)
    after = jsonl_rows(out)
    assert by_ticket(after) == by_ticket(reference[0]) and after[: len(before)] == before


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_group_in_hand_and_exits_128_plus_signal_through_the_cli(
    sig: signal.Signals, stage_a_data: Path, tree_root: Path, tmp_path: Path,
    reference: tuple[list[dict[str, Any]], dict, Path],
) -> None:  # fmt: skip
    """What a scheduler sends before it kills (or Ctrl+C): the run stops at the next batch, lines whole."""
    out = tmp_path / "stage_a.jsonl"
    env = cli_env(tmp_path, stage_a_data)
    overrides = overrides_for(tree_root, f"stage_a.output_jsonl={out}")
    with open(tmp_path / "run1.stderr", "wb") as stderr:
        proc = subprocess.Popen(cli_args(overrides, tmp_path / "run1"), cwd=tmp_path, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while complete_lines(out) < 1 and proc.poll() is None:
                assert time.monotonic() < deadline, "no Stage-A line within 60 s"
                time.sleep(0.01)
            proc.send_signal(sig)
            rc = proc.wait(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    tail = (tmp_path / "run1.stderr").read_text(encoding="utf-8", errors="replace")[-3000:]
    assert rc == 128 + sig, tail
    assert f"stopped on {sig.name}" in tail
    before = jsonl_rows(out)  # every line whole
    assert 1 <= len(before) < len(reference[0])
    assert (tmp_path / "run1" / "metrics.json").is_file()  # written on the way out
    resumed = run_cli(overrides, tmp_path / "run2", env)
    assert resumed.returncode == 0, resumed.stderr.decode("utf-8", "replace")[-3000:]
    assert by_ticket(jsonl_rows(out)) == by_ticket(reference[0])


def test_resume_with_other_generation_settings_is_refused_unless_appending(
    compose_at: ComposeAt, stage_a_data: Path, tree_root: Path, tmp_path: Path,
    reference: tuple[list[dict[str, Any]], dict, Path],
) -> None:  # fmt: skip
    out = tmp_path / "stage_a.jsonl"
    shutil.copy(reference[2] / "stage_a.jsonl", out)
    shutil.copy(reference[2] / "stage_a.jsonl.settings.json", tmp_path / "stage_a.jsonl.settings.json")
    fewer_tokens = overrides_for(tree_root, f"stage_a.output_jsonl={out}", "module.max_new_tokens=4")
    with pytest.raises(ValueError, match=r"other settings \(generation.max_new_tokens: 8 -> 4\)"):
        run_in_process(compose_at, fewer_tokens, tmp_path / "refused", stage_a_data)
    assert out.read_bytes() == (reference[2] / "stage_a.jsonl").read_bytes()
    run_in_process(
        compose_at, [*fewer_tokens, "stage_a.append_anyway=true"], tmp_path / "mixed", stage_a_data
    )
    record = json.loads((tmp_path / "stage_a.jsonl.settings.json").read_text(encoding="utf-8"))
    assert [s["generation"]["max_new_tokens"] for s in record] == [8, 4]  # the file says it is mixed


def test_resume_does_not_regenerate_written_groups(
    killed_then_resumed: dict[str, Any], records: list[GroupRecord]
) -> None:
    done = sum(len(row["images"]) for row in killed_then_resumed["before"])
    metrics = killed_then_resumed["metrics"]
    assert 0 < done < record_images(records)
    assert metrics["stage_a/images"] == record_images(records) - done


# ------------------------------------------------------------------ 4. a corrupt image


@pytest.fixture(scope="module")
def corrupt_tree(
    tree_root: Path, records: list[GroupRecord], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, GroupRecord, Path]:
    """A copy of the tree whose second group's second image is garbage: ``(root, record, bad file)``."""
    root = tmp_path_factory.mktemp("corrupt") / "test"
    shutil.copytree(tree_root, root)
    victim = records[1]
    bad = root / victim.image_paths[1].relative_to(tree_root)
    bad.write_bytes(b"this is not a JPEG \x00\xff" * 20)
    return root, victim, bad


def test_non_strict_skips_and_counts_the_corrupt_group(
    compose_at: ComposeAt,
    stage_a_data: Path,
    corrupt_tree: tuple[Path, GroupRecord, Path],
    reference: tuple[list[dict[str, Any]], dict, Path],
    records: list[GroupRecord],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, victim, bad = corrupt_tree
    out = tmp_path / "stage_a.jsonl"
    with caplog.at_level(logging.WARNING, logger="bbuqc_lightning.stage_a.datamodule"):
        metrics = run_in_process(
            compose_at,
            overrides_for(root, "data.strict=false", f"stage_a.output_jsonl={out}"),
            tmp_path,
            stage_a_data,
        )
    assert any(str(bad) in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)
    assert metrics["stage_a/skipped_groups"] == 1
    assert metrics["stage_a/groups"] == len(records) - 1
    assert metrics["stage_a/images"] == record_images(records) - len(victim.image_paths)
    expected = {k: v for k, v in by_ticket(reference[0]).items() if k != victim.ticket_key}
    assert by_ticket(jsonl_rows(out)) == expected


@pytest.mark.parametrize("cores", [1, 2])
def test_image_checks_on_threads_keep_the_sequential_outcome_and_order(
    corrupt_tree: tuple[Path, GroupRecord, Path],
    tree_root: Path,
    records: list[GroupRecord],
    tmp_path: Path,
    cores: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A thread per core checks the groups' images before inference (Pillow decodes without the GIL);
    strict or not, the result is a sequential pass's: the same groups kept, the bad ones skipped in tree
    order, and strict names the first bad group."""
    root = tmp_path / "test"
    shutil.copytree(corrupt_tree[0], root)
    (root / records[3].image_paths[0].relative_to(tree_root)).write_bytes(b"\x00" * 64)  # a 2nd bad group
    prompts = OmegaConf.to_container(OmegaConf.load(config_dir() / "prompts" / "stage_a.yaml"))
    monkeypatch.setattr("bbuqc_lightning.stage_a.datamodule.os.cpu_count", lambda: cores)
    dm = StageADataModule(str(root), prompts, batch_size=4, strict=False)
    dm.setup("predict")
    dm.predict_dataloader()
    assert [r.ticket_key for r in dm.records] == [
        r.ticket_key for i, r in enumerate(records) if i not in (1, 3)
    ]
    reasons = [reason for _, reason in dm.skipped]
    assert len(reasons) == 2, reasons
    assert reasons[0].startswith(f"group {records[1].ticket_key}: ")
    assert reasons[1].startswith(f"group {records[3].ticket_key}: ")
    strict = StageADataModule(str(root), prompts, batch_size=4, strict=True)
    strict.setup("predict")
    with pytest.raises(ValueError, match=f"group {records[1].ticket_key}: "):
        strict.predict_dataloader()


def test_strict_run_exits_with_a_located_error(
    compose_at: ComposeAt, stage_a_data: Path, corrupt_tree: tuple[Path, GroupRecord, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """``train_or_exit`` (the command line's ``train``): one located ``error:`` line, exit 2, nothing written.
    The same through ``python -m bbuqc_lightning.train``: ``test_strict_run_..._through_the_cli`` (slow)."""
    root, victim, bad = corrupt_tree
    out = tmp_path / "stage_a.jsonl"
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cfg = compose_at(
        overrides_for(root, "data.strict=true", f"stage_a.output_jsonl={out}"), tmp_path, stage_a_data
    )
    code = exit_code_of_train(cfg)
    stderr = capsys.readouterr().err
    assert code == 2
    assert str(bad) in stderr and victim.ticket_key in stderr
    assert stderr.startswith("error: ") and len(stderr.splitlines()) == 1 and "Traceback" not in stderr
    assert "Traceback (most recent call last)" in (tmp_path / "run" / "error.log").read_text(encoding="utf-8")
    assert not out.exists() or out.read_bytes() == b""  # nothing half-done


@pytest.mark.slow
def test_strict_run_exits_with_a_located_error_through_the_cli(
    stage_a_data: Path, corrupt_tree: tuple[Path, GroupRecord, Path], tmp_path: Path
) -> None:
    root, victim, bad = corrupt_tree
    out = tmp_path / "stage_a.jsonl"
    env = cli_env(tmp_path, stage_a_data)
    args = overrides_for(root, "data.strict=true", f"stage_a.output_jsonl={out}")
    proc = run_cli(args, tmp_path / "run", env)
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode != 0
    assert str(bad) in stderr and victim.ticket_key in stderr
    assert "error: " in stderr and "Traceback" not in stderr
    assert not out.exists() or out.read_bytes() == b""  # nothing half-done


# ------------------------------------------------------------------ 6. DDP, 2 CPU ranks (gloo)


def _assert_one_file(out: Path) -> None:
    """The shards are merged into ``out`` and deleted; nothing else next to it but its settings record."""
    assert list_shards(out) == []
    assert sorted(p.name for p in out.parent.glob(f"{out.name}*")) == [out.name, settings_path(out).name]


@pytest.mark.parametrize(
    "strategy",
    # fork: the ranks reuse the model built in this process (fast). spawn (trainer=ddp_cpu as shipped):
    # fresh interpreters that re-import everything (~30 s on 2 busy cores: slow).
    ["ddp_fork", pytest.param("ddp_spawn", marks=pytest.mark.slow)],
)
def test_ddp_two_cpu_ranks_write_every_group_once(
    strategy: str,
    compose_at: ComposeAt,
    stage_a_data: Path,
    tree_root: Path,
    reference: tuple[list[dict[str, Any]], dict, Path],
    records: list[GroupRecord],
    tmp_path: Path,
) -> None:
    out = tmp_path / "stage_a.jsonl"
    extra = ["trainer=ddp_cpu", f"trainer.strategy={strategy}", f"stage_a.output_jsonl={out}"]
    metrics = run_in_process(compose_at, overrides_for(tree_root, *extra), tmp_path, stage_a_data)
    _assert_one_file(out)
    assert by_ticket(jsonl_rows(out)) == by_ticket(reference[0])  # each group once, same summaries
    # Summed over both ranks, and back in the parent process that spawned/forked them.
    assert metrics["stage_a/images"] == record_images(records)
    assert metrics["stage_a/groups"] == len(records)


def test_ddp_resume_with_a_rank_left_nothing_to_do(
    compose_at: ComposeAt,
    stage_a_data: Path,
    tree_root: Path,
    reference: tuple[list[dict[str, Any]], dict, Path],
    tmp_path: Path,
) -> None:
    """A killed 4-rank run left one line (and a torn one) in the output and two in a shard: the 2-rank
    rerun has one group to do, so rank 1 gets an empty dataloader, and must neither fail nor hang."""
    rows = reference[0]
    out = tmp_path / "stage_a.jsonl"
    dump = [dumps_line(row) for row in rows]
    out.write_bytes(dump[0] + TORN_TAIL)
    shard_path(out, 3).write_bytes(dump[1] + dump[2])
    extra = ["trainer=ddp_cpu", "trainer.strategy=ddp_fork", f"stage_a.output_jsonl={out}"]
    metrics = run_in_process(compose_at, overrides_for(tree_root, *extra), tmp_path, stage_a_data)
    _assert_one_file(out)
    after = jsonl_rows(out)
    assert by_ticket(after) == by_ticket(rows) and after[0] == rows[0]
    assert metrics["stage_a/groups"] == 1
    assert metrics["stage_a/images"] == len(rows[3]["images"])


def test_rerun_with_nothing_left_still_merges_leftover_shards(
    compose_at: ComposeAt,
    stage_a_data: Path,
    tree_root: Path,
    reference: tuple[list[dict[str, Any]], dict, Path],
    tmp_path: Path,
) -> None:
    """Every group is already in the shards of a killed DDP run: the 1-process rerun generates nothing
    (Lightning skips the predict loop) but must still merge the shards, and report zero work."""
    rows = reference[0]
    out = tmp_path / "stage_a.jsonl"
    dump = [dumps_line(row) for row in rows]
    shard_path(out, 0).write_bytes(dump[0] + dump[2])
    shard_path(out, 1).write_bytes(dump[1] + dump[3])
    metrics = run_in_process(
        compose_at, overrides_for(tree_root, f"stage_a.output_jsonl={out}"), tmp_path, stage_a_data
    )
    _assert_one_file(out)
    assert by_ticket(jsonl_rows(out)) == by_ticket(rows)
    assert metrics["stage_a/images"] == 0 and metrics["stage_a/groups"] == 0


@pytest.fixture(autouse=True)
def _no_hydra_leak() -> Iterator[None]:
    yield
    HydraConfig.instance().cfg = None


# ------------------------------------------------------------------ the end of a predict run
def _counting_module() -> Any:
    import lightning as L

    class Module(L.LightningModule):
        """The smallest module that predicts, counting the ``cpu()`` calls Lightning makes on it."""

        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
            self.moves_to_host = 0

        def cpu(self) -> Any:
            self.moves_to_host += 1
            return super().cpu()

        def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layer(batch[0])

    return Module()


@pytest.mark.parametrize("keep", [False, True])
def test_a_predict_run_leaves_the_model_where_it_ran(keep: bool) -> None:
    """Lightning's single-device teardown copies the model to host memory when a run ends (5-6 s after Stage-A's
    last batch for a 4B model on one H100); ``keep_model_on_device`` (the entry point's, for every stage but
    ``fit``) skips that copy and nothing else. Without it the copy happens: the count is what Lightning does."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from bbuqc_lightning.strategy import KeepOnDeviceStrategy, keep_model_on_device

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if keep:
        keep_model_on_device(trainer)
        assert isinstance(trainer.strategy, KeepOnDeviceStrategy)
    module = _counting_module()
    predicted = trainer.predict(module, DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2))
    assert predicted is not None and len(predicted) == 2
    assert module.moves_to_host == (0 if keep else 1)
    assert trainer.state.finished and trainer.strategy.lightning_module is module  # torn down, module kept


@pytest.mark.parametrize("logger", ["none", "wandb"])
def test_nothing_holds_a_finished_run_but_its_objects(
    compose: Callable[[list[str]], DictConfig], logger: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hydra multirun's jobs share one process, and a run that does not train keeps its model on its device:
    once ``train`` has returned and its objects are dropped, the cycle collector (``hydra_main`` runs it after
    each job) must free the model, the module, the trainer and the engine with its KV pool, so the next job
    loads its own model into free memory. Fails if a global (a registry, a cache, a logger) keeps any of them."""
    import gc
    import weakref

    from bbuqc_lightning.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")  # the default logger, offline (its run finished by train)
    cfg = compose(
        [
            "+experiment=stage_a",
            f"logger={logger}",
            "+trainer.limit_predict_batches=1",
            "data.batch_size=2",
            "synthetic.groups_per_split={train:1,val:1,test:1}",
            "module.max_new_tokens=4",
        ]
    )
    metrics, objects = train(cfg)
    assert metrics["stage_a/images"] == 2
    kept = {
        "model": weakref.ref(objects["bundle"].model),
        "module": weakref.ref(objects["module"]),
        "trainer": weakref.ref(objects["trainer"]),
        "engine": weakref.ref(objects["module"].engine),
    }
    assert all(ref() is not None for ref in kept.values())
    del objects
    gc.collect()
    assert [name for name, ref in kept.items() if ref() is not None] == []
