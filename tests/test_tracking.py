"""W&B tracking: when runs are offline, and a real Stage-A run that leaves its W&B run, CSV metrics and
metrics.json in the Hydra run folder and always finishes W&B."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bbuqc_lightning.strategy import KeepOnDeviceStrategy
from bbuqc_lightning.tracking.wandb import (
    configure_wandb_env,
    find_wandb_logger,
    finish_wandb,
    log_artifact,
    log_table,
    wandb_offline,
)

WANDB_NETRC = "machine api.wandb.ai\n  login user\n  password 0123456789abcdef0123456789abcdef01234567\n"
OTHER_NETRC = "machine github.com login someone password token\n"
# Everything configure_wandb_env / train may set in os.environ: undone after each test.
RUN_ENV_KEYS = (
    "WANDB_MODE",
    "WANDB_API_KEY",
    "WANDB_SILENT",
    "WANDB_CONSOLE",
    "WANDB_DISABLE_GIT",
    "WANDB_INIT_TIMEOUT",
    "WANDB_BASE_URL",
    "NETRC",
    "PL_GLOBAL_SEED",
    "PL_SEED_WORKERS",
)


def clear_env(monkeypatch: pytest.MonkeyPatch, keys: tuple[str, ...] = RUN_ENV_KEYS) -> None:
    """Unset ``keys`` such that monkeypatch also removes whatever the code under test sets later."""
    for key in keys:
        monkeypatch.setenv(key, "placeholder")  # records the original value (or its absence) for undo
        monkeypatch.delenv(key)


def write_netrc(home: Path, text: str, mode: int = 0o600) -> Path:
    path = home / ".netrc"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


# --------------------------------------------------------------------------- wandb_offline truth table
@pytest.mark.parametrize(
    ("mode", "api_key", "netrc", "offline"),
    [
        (None, None, None, True),  # nothing configured: offline
        (None, None, OTHER_NETRC, True),  # a netrc without W&B
        (None, None, "machine\n", True),  # unparsable netrc: offline, no crash
        (None, "", None, True),  # an empty key is no key
        (None, "k" * 40, None, False),
        (None, None, WANDB_NETRC, False),  # `wandb login` wrote ~/.netrc
        ("online", None, None, False),
        ("ONLINE", None, None, False),
        ("offline", "k" * 40, WANDB_NETRC, True),  # an explicit mode wins over a key
        ("OFFLINE", None, WANDB_NETRC, True),
        ("disabled", "k" * 40, None, True),
        ("dryrun", None, WANDB_NETRC, True),
        ("", "k" * 40, None, False),  # an empty mode is no mode
    ],
)
def test_wandb_offline_truth_table(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    mode: str | None,
    api_key: str | None,
    netrc: str | None,
    offline: bool,
) -> None:
    clear_env(monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path))
    if mode is not None:
        monkeypatch.setenv("WANDB_MODE", mode)
    if api_key is not None:
        monkeypatch.setenv("WANDB_API_KEY", api_key)
    if netrc is not None:
        write_netrc(tmp_path, netrc)
    assert wandb_offline() is offline


@pytest.mark.parametrize(
    "case", ["group_readable_netrc", "NETRC_variable", "self_hosted_server", "entry_without_password"]
)
def test_wandb_offline_agrees_with_wandb_key_lookup(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, case: str
) -> None:
    clear_env(monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path))
    expected_offline = False
    if case == "group_readable_netrc":
        write_netrc(tmp_path, WANDB_NETRC, mode=0o644)  # wandb reads the key from it
    elif case == "NETRC_variable":
        elsewhere = tmp_path / "secrets"
        elsewhere.mkdir()
        monkeypatch.setenv("NETRC", str(write_netrc(elsewhere, WANDB_NETRC)))
    elif case == "self_hosted_server":
        monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
        write_netrc(tmp_path, WANDB_NETRC.replace("api.wandb.ai", "wandb.example.com"))
    else:
        write_netrc(tmp_path, "machine api.wandb.ai login user\n")
        expected_offline = True  # wandb finds no key there and would fail to start online
    assert wandb_offline() is expected_offline


@pytest.mark.parametrize(("configured", "expected_mode"), [(False, "offline"), (True, None)])
def test_configure_wandb_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, configured: bool, expected_mode: str | None
) -> None:
    clear_env(monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path))
    if configured:
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_CONSOLE", "wrap")  # a user's own setting is kept
    configure_wandb_env()
    assert os.environ.get("WANDB_MODE") == expected_mode
    assert os.environ["WANDB_SILENT"] == "true"
    assert os.environ["WANDB_CONSOLE"] == "wrap"
    assert os.environ["WANDB_DISABLE_GIT"] == "true"
    assert int(os.environ["WANDB_INIT_TIMEOUT"]) > 0


def test_wandb_helpers_are_no_ops_without_a_wandb_logger(tmp_path: Path) -> None:
    import wandb

    assert find_wandb_logger(None) is None
    log_table(None, "key", ["a"], [[1]])
    log_artifact(None, tmp_path, "name", "dataset")
    assert wandb.run is None
    finish_wandb()  # nothing to finish: safe
    finish_wandb()


# --------------------------------------------------------------------------- a Stage-A run, end to end
LIMIT_IMAGES = 4  # 2 predict batches of 2 images
STAGE_A_OVERRIDES = [
    "+experiment=stage_a",
    "logger=wandb",
    "+trainer.limit_predict_batches=2",  # not in trainer/default.yaml, hence the `+`
    "data.batch_size=2",
    "synthetic.groups_per_split={train:1,val:1,test:1}",
    "module.max_new_tokens=8",
]


def test_finish_wandb_leaves_every_logged_metric_on_disk(tmp_path: Path) -> None:
    """``wandb.finish()`` alone often leaves the ``.wandb`` file at its 7-byte header for a while."""
    import wandb

    from bbuqc_lightning.tracking.wandb import finish_wandb

    for i in range(5):
        run = wandb.init(dir=str(tmp_path / str(i)), project="bbuqc-test", mode="offline")
        run.log({"probe/metric": float(i)})
        finish_wandb()
        data = next((tmp_path / str(i) / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
        assert b"probe/metric" in data, f"run {i}: {len(data)} bytes on disk after finish"


@pytest.fixture(scope="module")
def stage_a_run(
    tmp_path_factory: pytest.TempPathFactory, compose_at: Callable[[list[str], Path, Path], DictConfig]
) -> SimpleNamespace:
    """One `train(cfg)` of `+experiment=stage_a`: 2 batches of the tiny synthetic test split (4 groups)."""
    pytest.importorskip(
        "bbuqc_lightning.callbacks.stage_a_writer", reason="the Stage-A JSONL writer is not written yet"
    )
    import wandb

    from bbuqc_lightning.train import train

    root = tmp_path_factory.mktemp("stage_a_run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        clear_env(monkeypatch)
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("HOME", str(root))  # W&B caches and settings stay inside the test folder
        monkeypatch.chdir(root)
        cfg = compose_at(STAGE_A_OVERRIDES, root, root / "data")
        try:
            metrics, objects = train(cfg)
            run_after = wandb.run
        finally:
            HydraConfig.instance().cfg = None
    return SimpleNamespace(
        root=root, output_dir=root / "run", cfg=cfg, metrics=metrics, objects=objects, run_after=run_after
    )


def test_wandb_offline_run_lands_in_the_run_folder(stage_a_run: SimpleNamespace) -> None:
    run_files = list((stage_a_run.output_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    assert run_files[0].stat().st_size > 0
    assert not (stage_a_run.root / "wandb").exists()  # nothing in the working directory


def test_wandb_run_holds_the_logged_metrics(stage_a_run: SimpleNamespace) -> None:
    run_dir = next((stage_a_run.output_dir / "wandb").glob("offline-run-*"))
    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    summary = run_dir / "files" / "wandb-summary.json"
    keys = set(json.loads(summary.read_text())) if summary.is_file() else set()
    for key in ("stage_a/images", "stage_a/groups", "stage_a/images_per_s", "model/params_total"):
        assert key.encode() in data or key in keys, key


def test_wandb_is_finished_after_train(stage_a_run: SimpleNamespace) -> None:
    import wandb

    assert stage_a_run.run_after is None
    assert wandb.run is None
    assert find_wandb_logger(stage_a_run.objects["trainer"]) is not None
    assert stage_a_run.objects["trainer"].state.finished
    # a predict run keeps its model where it ran (no copy back to host memory at the end)
    assert isinstance(stage_a_run.objects["trainer"].strategy, KeepOnDeviceStrategy)


def test_metrics_json_holds_the_run_summary(stage_a_run: SimpleNamespace) -> None:
    """Predict loops cannot self.log(): the module's run summary must still reach metrics.json."""
    path = stage_a_run.output_dir / "metrics.json"
    assert path.is_file()
    written = json.loads(path.read_text(encoding="utf-8"))
    assert written == stage_a_run.metrics
    assert all(isinstance(value, float) for value in written.values())
    assert written["stage_a/images"] == LIMIT_IMAGES
    assert written["stage_a/groups"] == 4.0  # one group per mission
    assert written["stage_a/images_per_s"] > 0


def test_csv_metrics(stage_a_run: SimpleNamespace) -> None:
    csv_files = list((stage_a_run.output_dir / "csv").rglob("metrics.csv"))
    assert len(csv_files) == 1
    rows = list(csv.DictReader(csv_files[0].open(encoding="utf-8")))
    assert [float(row["stage_a/images"]) for row in rows if row.get("stage_a/images")] == [LIMIT_IMAGES]


def test_limited_run_writes_only_whole_groups(stage_a_run: SimpleNamespace) -> None:
    """A loop cut short on purpose (limit_predict_batches, debug=limit) finishes; groups cut in the middle
    are left out of the JSONL (a rerun without the limit completes them) rather than failing the run."""
    datamodule: Any = stage_a_run.objects["datamodule"]
    assert len(datamodule.dataset) > LIMIT_IMAGES  # the limit really cut the loop
    complete, seen = [], 0  # groups whose images all fall in the first batches (dataset order = records)
    for record in datamodule.records:
        seen += len(record.image_paths)
        if seen > LIMIT_IMAGES:
            break
        complete.append(record.ticket_key)
    lines = (stage_a_run.output_dir / "stage_a.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["ticket_key"] for line in lines] == complete
