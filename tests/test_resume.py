"""Exact resume of the training stages (GRPO, fusion SFT) from their Lightning checkpoints.

Each test compares a resumed run with an uninterrupted one of the same config, on CPU with LoRA
dropout on, mid-epoch: the steps after the resume point must log the same loss and reward to the last
bit. A checkpoint written after ``fit`` returned (``last.ckpt`` at ``max_steps``) and one written inside a
run (what is left after ``kill -9``) both resume. Each test takes about 5-15 s on an idle 2-core machine
once the synthetic data exists (the session's ``data_dir``), so they run in the default suite.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import exit_code_of_train
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bbuqc_lightning.grpo.module import GRPOModule
from bbuqc_lightning.train import train

Compose = Callable[[list[str], Path, Path], DictConfig]

COMMON = [
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.limit_val_batches=0",
    "optimized_metric=null",
]
GRPO_BASE = ["+experiment=grpo", "module.grpo.max_new_tokens=6", "module.grpo.num_generations=2"]
GRPO = [
    *GRPO_BASE,
    "module.lora.dropout=0.1",
    # The tiny random model never writes a valid verdict (label and format rewards 0): a reward that varies
    # between samples gives non-zero advantages, so the adapters move and every step depends on the last.
    "+module.reward_funcs.length._target_=test_resume.completion_length_reward",
    "+module.reward_funcs.length._partial_=true",
    "module.grpo.reward_weights=[1.0,0.2,0.0,1.0]",
]
FUSION = ["+experiment=fusion_sft", "data.batch_size=2", "module.lora.dropout=0.1"]
EVERY_STEP = (
    "callbacks.model_checkpoint.every_n_train_steps=1"  # a checkpoint per step, as a kill -9 leaves them
)


def completion_length_reward(completions: list[str], **kwargs: object) -> list[float]:
    return [len(c) / 10.0 for c in completions]


def logged(run: Path, key: str) -> dict[int, str]:
    """``{step: value}`` of ``key`` in a run's CSV metrics (values as written, so equality is bit-exact)."""
    path = run / "csv" / "metrics.csv"
    if not path.is_file():  # a run that trained no step logs nothing
        return {}
    with path.open(encoding="utf-8") as f:
        return {int(row["step"]): row[key] for row in csv.DictReader(f) if row.get(key)}


def fit_at(compose_at: Compose, root: Path, data_dir: Path, overrides: list[str]) -> Path:
    """One ``train()`` of ``COMMON + overrides`` with its run folder under ``root``; returns that folder."""
    cfg = compose_at(COMMON + overrides, root, data_dir)
    try:
        train(cfg)
    finally:
        HydraConfig.instance().cfg = None
    return root / "run"


@pytest.fixture
def fit(compose_at: Compose, tmp_path: Path, data_dir: Path) -> Callable[..., Path]:
    """``fit(name, overrides) -> run folder``: one ``train()`` of the composed config in ``tmp_path/name``."""
    return lambda name, overrides: fit_at(compose_at, tmp_path / name, data_dir, overrides)


def assert_resumed_exactly(full: Path, resumed: Path, steps: range, keys: tuple[str, ...]) -> None:
    for key in keys:
        reference, again = logged(full, key), logged(resumed, key)
        assert sorted(again) == [s - 1 for s in steps], f"{key}: the resumed run logged steps {sorted(again)}"
        assert [again[s - 1] for s in steps] == [reference[s - 1] for s in steps], key


# GRPO over 4 samples: 2 steps per epoch, so 2 epochs are 4 steps and a resume can cross an epoch end.
GRPO_EPOCHS = [*GRPO, "data.limit_samples=4", "trainer.max_steps=-1"]


@pytest.fixture(scope="module")
def grpo_full(compose_at: Compose, tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """The uninterrupted GRPO run both GRPO resume tests compare with: 2 epochs, a checkpoint every step."""
    root = tmp_path_factory.mktemp("grpo_full")
    return fit_at(compose_at, root, data_dir, [*GRPO_EPOCHS, "trainer.max_epochs=2", EVERY_STEP])


def test_grpo_resumes_from_last_ckpt_and_from_a_step_checkpoint(
    fit: Callable[..., Path], grpo_full: Path
) -> None:
    # The README's resume: last.ckpt written when fit returned mid-epoch (at max_steps=1; the checkpoint
    # cadence, 4 steps, never came), resumed with a larger budget: steps 2-4, across the epoch end.
    half = fit("half", [*GRPO_EPOCHS, "trainer.max_epochs=2", "trainer.max_steps=1"])
    resumed = fit(
        "resumed", [*GRPO_EPOCHS, "trainer.max_epochs=2", f"ckpt_path={half / 'checkpoints' / 'last.ckpt'}"]
    )
    assert_resumed_exactly(grpo_full, resumed, range(2, 5), ("train/loss", "train/reward"))
    # After kill -9 only the checkpoints written during the run are left: step 3's (mid-epoch) resumes too.
    step3 = grpo_full / "checkpoints" / "step3.ckpt"
    killed = fit("killed", [*GRPO_EPOCHS, "trainer.max_epochs=2", f"ckpt_path={step3}"])
    assert_resumed_exactly(grpo_full, killed, range(4, 5), ("train/loss", "train/reward"))


def test_fusion_sft_resumes_mid_epoch_with_dropout_bit_exactly(fit: Callable[..., Path]) -> None:
    full = fit("full", [*FUSION, "trainer.max_steps=4", EVERY_STEP])
    half = fit("half", [*FUSION, "trainer.max_steps=2"])
    resumed = fit(
        "resumed", [*FUSION, "trainer.max_steps=4", f"ckpt_path={half / 'checkpoints' / 'last.ckpt'}"]
    )
    assert_resumed_exactly(full, resumed, range(3, 5), ("train/loss",))
    killed = fit(
        "killed", [*FUSION, "trainer.max_steps=4", f"ckpt_path={full / 'checkpoints' / 'step3.ckpt'}"]
    )
    assert_resumed_exactly(full, killed, range(4, 5), ("train/loss",))


def test_grpo_resume_with_more_epochs_starts_the_next_epoch(
    fit: Callable[..., Path], grpo_full: Path
) -> None:
    one = fit("one", [*GRPO_EPOCHS, "trainer.max_epochs=1"])
    resumed = fit(
        "resumed", [*GRPO_EPOCHS, "trainer.max_epochs=2", f"ckpt_path={one / 'checkpoints' / 'last.ckpt'}"]
    )
    assert_resumed_exactly(grpo_full, resumed, range(3, 5), ("train/loss", "train/reward"))
    checkpoint = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"])  # adapters only


def test_sigterm_during_grpo_stops_after_the_step_with_a_resumable_last_ckpt(
    compose_at: Compose, tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """SIGTERM inside the second step (this process signals itself): that step finishes, ``last.ckpt`` is
    written mid-epoch with both steps, with ``metrics.json`` and the adapter, and the command line's
    ``train`` exits 143 (resuming a mid-epoch ``last.ckpt``: the tests above). The same from outside,
    through ``python -m bbuqc_lightning.train``: ``test_sigterm_..._through_the_cli`` (slow)."""
    training_step = GRPOModule.training_step

    def signalled_step(self: GRPOModule, batch: Any, batch_idx: int) -> Any:
        if self.trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(GRPOModule, "training_step", signalled_step)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cfg = compose_at(
        [*COMMON, *GRPO_BASE, "trainer.max_steps=200", EVERY_STEP], tmp_path / "stopped", data_dir
    )
    code = exit_code_of_train(cfg)
    assert code == 128 + signal.SIGTERM
    assert "error: stopped on SIGTERM" in capsys.readouterr().err
    run = tmp_path / "stopped" / "run"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2  # the step in hand was finished, no further one started
    epochs = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert epochs["started"] == 1 and epochs["completed"] == 0  # mid-epoch: a resume continues this epoch
    assert (run / "metrics.json").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_sigterm_during_grpo_stops_after_the_step_with_a_resumable_last_ckpt_through_the_cli(
    tmp_path: Path, data_dir: Path
) -> None:
    run = tmp_path / "run"
    command = [sys.executable, "-m", "bbuqc_lightning.train", *COMMON, *GRPO_BASE, "trainer.max_steps=200",
               EVERY_STEP, f"hydra.run.dir={run}", f"paths.data_dir={data_dir}", "extras.print_config=false"]  # fmt: skip
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "stderr", "wb") as stderr:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 300
            while not (run / "checkpoints" / "step1.ckpt").is_file() and proc.poll() is None:
                assert time.monotonic() < deadline, "no checkpoint within 300 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    tail = (tmp_path / "stderr").read_text(encoding="utf-8", errors="replace")[-3000:]
    assert rc == 128 + signal.SIGTERM, tail
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert 1 <= checkpoint["global_step"] < 200
    epochs = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert epochs["started"] == 1 and epochs["completed"] == 0  # mid-epoch: a resume continues this epoch
    assert (run / "metrics.json").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()


class _Scalar(__import__("lightning").LightningModule):
    """One trained scalar over a few random rows: enough for the checkpoint and stop logic."""

    def __init__(self, stop_at: int | None = None, kill_at_batch: int | None = None) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.stop_at, self.kill_at_batch = stop_at, kill_at_batch

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if (
            self.stop_at is not None and self.global_step + 1 == self.stop_at
        ) or batch_idx == self.kill_at_batch:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives inside the step; the run stops after it
        return ((self.w - batch[0]) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        rows = torch.utils.data.TensorDataset(torch.randn(64, generator=torch.Generator().manual_seed(0)))
        return torch.utils.data.DataLoader(rows, batch_size=4)


@pytest.mark.parametrize("ending", ["max_steps", "sigterm"])
def test_last_ckpt_holds_the_final_step_after_periodic_checkpoints(tmp_path: Path, ending: str) -> None:
    """Lightning writes last.ckpt at the end only when no periodic checkpoint was saved; ours always does."""
    import lightning as L

    from bbuqc_lightning.callbacks.model_checkpoint import LastAtEndCheckpoint
    from bbuqc_lightning.tracking.signals import stop_on_signals

    checkpoint = LastAtEndCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=-1, every_n_train_steps=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[checkpoint], default_root_dir=str(tmp_path))  # fmt: skip
    module = _Scalar(stop_at=5 if ending == "sigterm" else None)
    with stop_on_signals(trainer):
        trainer.fit(module)
    final = 5 if ending == "sigterm" else 6
    assert trainer.global_step == final
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == final


def test_a_signal_inside_a_gradient_accumulation_window_stops_at_its_end(tmp_path: Path) -> None:
    """Stopping after micro-batch 3 of windows of 2 would save a checkpoint that counts batch 3 as trained while its
    gradient was never applied: the run finishes the window (batch 4, optimizer step 2) first."""
    import lightning as L

    from bbuqc_lightning.callbacks.model_checkpoint import LastAtEndCheckpoint
    from bbuqc_lightning.tracking.signals import stop_on_signals

    checkpoint = LastAtEndCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=100)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, accumulate_grad_batches=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoint],
                        default_root_dir=str(tmp_path))  # fmt: skip
    with stop_on_signals(trainer):
        trainer.fit(_Scalar(kill_at_batch=2))  # the third micro-batch
    assert trainer.global_step == 2
    loops = torch.load(tmp_path / "last.ckpt", weights_only=False)["loops"]["fit_loop"]
    assert loops["epoch_loop.batch_progress"]["current"]["completed"] == 4
