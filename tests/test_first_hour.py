"""A newcomer's first hour: short runs succeed, output is quiet, errors come before any model loads, the
progress bar's total follows ``max_steps``, tools answer ``--help`` without loading torch, adapters say how
to rebuild their base, and the demos produce real output (the slow test runs ``tools/distill.py`` on the
embedded defaults). The one-line command-line errors are in ``test_config.py`` (``cli_runs``)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from omegaconf import DictConfig

import bbuqc_lightning.models.factory as factory
from bbuqc_lightning.callbacks.adapter_checkpoint import BASE_FILE
from bbuqc_lightning.callbacks.progress_bar import (
    StepBoundedRichProgressBar,
    StepBoundedTQDMProgressBar,
    steps_bounded_total,
)
from bbuqc_lightning.config import config_dir
from bbuqc_lightning.data.jsonl import read_jsonl
from bbuqc_lightning.quiet import quiet_known_warnings
from bbuqc_lightning.stage_b.contract import parse_verdict
from bbuqc_lightning.stage_b_runner import tiny_teacher
from bbuqc_lightning.train import optimized_value, train

ComposeFn = Callable[[list[str]], DictConfig]
REPO = config_dir().parent
TOOLS = sorted(p.name for p in (REPO / "tools").glob("*.py"))


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "WANDB_SWEEP_ID")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    return env


# ------------------------------------------------------------------------------ validation comes first
def test_a_wrong_setting_fails_before_the_model_loads(
    compose: ComposeFn, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model factory was called before the config was validated")

    monkeypatch.setattr(factory, "load_model", no_model)
    cfg = compose(["+experiment=grpo", "module.grpo.learning_rate=-1e-5", "trainer.max_steps=-5"])
    with pytest.raises(ValueError) as info:
        train(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert "learning_rate must be > 0" in message and "trainer.max_steps must be -1" in message
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_missing_input_file_is_reported_before_the_model_loads(compose: ComposeFn, tmp_path: Path) -> None:
    cfg = compose(["+experiment=grpo", f"data.train_jsonl={tmp_path / 'nope.jsonl'}", "ckpt_path=nope.ckpt"])
    with pytest.raises(ValueError, match=r"data\.train_jsonl=.*nope\.jsonl: no such file.*ckpt_path=nope"):
        train(cfg)


# ------------------------------------------------------------------------------ optimized_metric
def test_unlogged_optimized_metric_warns_for_a_plain_run(
    compose: ComposeFn, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    cfg = compose(["+experiment=grpo"])
    with caplog.at_level(logging.WARNING):
        assert optimized_value(cfg, {"train/loss": 1.0}, "RUN") is None
    assert "optimized_metric 'val/accuracy' was not logged" in caplog.text
    assert optimized_value(cfg, {"val/accuracy": 0.5}, "RUN") == 0.5


@pytest.mark.parametrize("context", ["hydra_multirun", "wandb_agent"])
def test_unlogged_optimized_metric_is_an_error_for_a_sweep(
    compose: ComposeFn, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], context: str
) -> None:
    cfg = compose(["+experiment=grpo"])
    mode = "MULTIRUN" if context == "hydra_multirun" else "RUN"
    if context == "wandb_agent":
        monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    else:
        monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    with pytest.raises(SystemExit) as info:
        optimized_value(cfg, {"train/loss": 1.0}, mode)
    assert info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: optimized_metric 'val/accuracy' was not logged")


def test_fusion_file_without_val_jsonl_trains_and_exits_0(tmp_path: Path, data_dir: Path) -> None:
    """The team's fusion files have no val_jsonl: the run trains, says validation is skipped, exits 0."""
    fusion = tmp_path / "team.yaml"
    fusion.write_text(
        "targets:\n  - {name: verdicts, dataset: chat, template: chatml, ratio: 0.1,\n"
        '     train_jsonl: "${synthetic_dir}/fusion/stage_b_train.jsonl"}\n',
        encoding="utf-8",
    )
    run = tmp_path / "run"
    command = [sys.executable, "-m", "bbuqc_lightning.train", "+experiment=fusion_sft", f"data.fusion={fusion}",
               "trainer.max_steps=1", "logger=none", f"hydra.run.dir={run}", f"paths.data_dir={data_dir}",
               "data.batch_size=2"]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "validation is skipped" in output
    assert "WARNING optimized_metric 'val/loss' was not logged" in output
    assert "error:" not in output and "Traceback" not in output
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "metrics.json").is_file()
    # quiet: the resolved config is not printed (one line points at it), no known library noise
    assert "targets:" not in output and f"config in {run}/.hydra/config.yaml" in output
    for noise in ("💡 Tip", "anonymous setting", "LeafSpec", "is_gradient_checkpointing"):
        assert noise not in output, noise


@pytest.mark.parametrize(
    "message",
    [
        "The dirpath has changed from '/r/2026-01-01_00-00-00/checkpoints' to '/r/2026-01-01_00-10-00/checkpoints',"
        " therefore `best_model_score`, `kth_best_model_path`, `kth_value`, `last_model_path` and `best_k_models`"
        " won't be reloaded. Only `best_model_path` will be reloaded.",
        "Total length of `Lookahead` across ranks is zero. Please make sure this was your intention.",
    ],
)
def test_known_library_messages_are_filtered_and_others_are_not(message: str) -> None:
    """Every resume (a new run folder by design) and a Stage-A rerun with nothing left printed these."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        warnings.warn(message, UserWarning, stacklevel=1)
        warnings.warn("something else entirely", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else entirely"]


# ------------------------------------------------------------------------------ progress bar
def test_progress_total_follows_max_steps_and_limits(tmp_path: Path) -> None:
    progress = SimpleNamespace(current=SimpleNamespace(completed=0))
    trainer = SimpleNamespace(num_training_batches=16, max_steps=4, global_step=0, accumulate_grad_batches=1,
                              fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))  # fmt: skip
    assert steps_bounded_total(trainer) == 4  # type: ignore[arg-type]
    trainer.global_step, trainer.accumulate_grad_batches = 3, 2
    assert steps_bounded_total(trainer) == 2  # type: ignore[arg-type]
    progress.current.completed = 6  # resumed mid-epoch: the bar counts on from the epoch's batch index
    assert steps_bounded_total(trainer) == 8  # type: ignore[arg-type]
    trainer.max_steps = -1
    assert steps_bounded_total(trainer) == 16  # type: ignore[arg-type]

    bar = StepBoundedRichProgressBar()
    fit = L.Trainer(max_epochs=1, max_steps=3, callbacks=[bar], logger=False, enable_checkpointing=False,
                    default_root_dir=tmp_path, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    fit.fit(BoringModel())  # 64 batches per epoch
    assert bar.progress is not None and bar.train_progress_bar.total == 3
    assert fit.global_step == 3


@pytest.mark.parametrize("bar_class", [StepBoundedRichProgressBar, StepBoundedTQDMProgressBar])
def test_progress_total_after_a_resume_mid_epoch(bar_class: type, tmp_path: Path) -> None:
    """3 steps, then resumed to 5 in the same epoch: the bar reads 4/5 and 5/5 (it read 4/1 and 5/1, or no
    total at all with tqdm, when its total ignored the batches run before the resume)."""
    seen: list[tuple[float, float | None]] = []

    class Spy(bar_class):  # type: ignore[misc, valid-type]
        def on_train_batch_end(self, trainer: L.Trainer, *args: object, **kwargs: object) -> None:
            super().on_train_batch_end(trainer, *args, **kwargs)
            if isinstance(self, StepBoundedRichProgressBar):
                task = self.progress.tasks[self.train_progress_bar_id]
                seen.append((task.completed, task.total))
            else:
                seen.append((self.train_progress_bar.n, self.train_progress_bar.total))

    def fit(steps: int, bar: L.Callback, out: Path, ckpt: Path | None = None) -> None:
        L.Trainer(max_epochs=-1, max_steps=steps, logger=False, default_root_dir=tmp_path,
                  callbacks=[bar, ModelCheckpoint(dirpath=out, save_last=True, every_n_train_steps=1)],
                  enable_model_summary=False, limit_val_batches=0).fit(BoringModel(), ckpt_path=ckpt)  # fmt: skip

    fit(3, Spy(), tmp_path / "first")
    assert seen == [(1, 3), (2, 3), (3, 3)]
    seen.clear()
    fit(5, Spy(), tmp_path / "resumed", tmp_path / "first" / "last.ckpt")
    assert seen == [(4, 5), (5, 5)]


# ------------------------------------------------------------------------------ tools
def probe_imports(
    argv: list[str], run: str, exit_codes: tuple, heavy: set[str]
) -> subprocess.CompletedProcess[str]:
    """In a fresh interpreter, ``sys.argv = argv`` and ``run`` (a ``runpy`` call), which must end with one of
    ``exit_codes``; stdout's last line is ``HEAVY`` when any module of ``heavy`` loaded, else ``LIGHT``
    (measured, not timed)."""
    probe = (
        "import runpy, sys\n"
        f"sys.argv = {argv!r}\n"
        f"try:\n    {run}\nexcept SystemExit as e:\n"
        f"    assert e.code in {exit_codes!r}, e.code\n"
        f"print('HEAVY' if {heavy!r} & set(sys.modules) else 'LIGHT')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], env=subprocess_env(), capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_help_does_not_load_torch(tool: str) -> None:
    """``--help`` answers before any heavy import: torch never loads."""
    result = probe_imports(
        [str(REPO / "tools" / tool), "--help"], "runpy.run_path(sys.argv[0], run_name='__main__')", (0, None),
        {"torch"},
    )  # fmt: skip
    assert result.stdout.strip().splitlines()[-1] == "LIGHT"
    assert "usage" in result.stdout.lower() or "Powered by Hydra" in result.stdout


def test_a_wrong_setting_is_reported_without_loading_torch(tmp_path: Path) -> None:
    """The ``error:`` line of a bad value comes before torch or Lightning load."""
    result = probe_imports(
        ["train", "+experiment=grpo", "module.grpo.learning_rate=-1e-5", "logger=none", f"hydra.run.dir={tmp_path}"],
        "runpy.run_module('bbuqc_lightning.train', run_name='__main__')", (2,), {"torch", "lightning"},
    )  # fmt: skip
    assert result.stdout.strip().splitlines()[-1] == "LIGHT"
    assert "learning_rate must be > 0" in result.stderr


# ------------------------------------------------------------------------------ adapter base
def test_adapter_says_how_to_rebuild_its_base_and_export_uses_it(compose: ComposeFn, tmp_path: Path) -> None:
    import importlib.util

    from peft import PeftModel

    from bbuqc_lightning.models.lora import apply_last_k_lora

    spec = importlib.util.spec_from_file_location("export_tool", REPO / "tools" / "export.py")
    assert spec and spec.loader
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    cfg = compose(["+experiment=grpo", "seed=3"])
    callback = instantiate(cfg.callbacks.adapter_checkpoint, _convert_="all")
    assert callback.base["preset"] == "tiny" and callback.base["model"]["random_init"] is True
    assert callback.base["model"]["seed"] == 3 and callback.base["merged_adapters"] == []

    bundle = instantiate(cfg.model, _convert_="all")  # the run's base: seed 3
    model = apply_last_k_lora(bundle.model, k=2, r=4, alpha=8, dropout=0.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    module = SimpleNamespace(model=model)
    fake_trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True)
    callback._save(fake_trainer, module)  # what on_validation_end / on_train_end do
    adapter = Path(cfg.paths.output_dir) / "adapter"
    assert json.loads((adapter / BASE_FILE).read_text(encoding="utf-8")) == callback.base

    out = tmp_path / "merged"
    assert tool.main(["--adapter", str(adapter), "--out", str(out)]) == 0
    ids = torch.tensor([[151644, 872, 198, 108386, 151645]])
    merged = type(bundle.model).from_pretrained(out).eval()
    with torch.no_grad():
        expected = (
            PeftModel.from_pretrained(instantiate(cfg.model, _convert_="all").model, str(adapter))
            .eval()(ids)
            .logits
        )
        assert torch.allclose(merged(ids).logits, expected, atol=1e-4)
    assert "preset tiny (random init, seed 3)" in (out / "bbuqc_export.json").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------ the demo Teacher
def test_tiny_teacher_is_fitted_once_and_cached(
    compose: ComposeFn, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = compose(["model=tiny_teacher", "model.steps=2", f"model.cache_dir={tmp_path / 'teacher'}"])
    fits: list[int] = []
    real_fit = tiny_teacher.fit
    monkeypatch.setattr(tiny_teacher, "fit", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    bundle = instantiate(cfg.model, _convert_="all")
    assert bundle.kind == "text" and fits == [1]
    assert json.loads((tmp_path / "teacher" / tiny_teacher.RECIPE_FILE).read_text())["steps"] == 2
    instantiate(cfg.model, _convert_="all")
    assert fits == [1]  # cached
    cfg = compose(["model=tiny_teacher", "model.steps=3", f"model.cache_dir={tmp_path / 'teacher'}"])
    instantiate(cfg.model, _convert_="all")
    assert fits == [1, 1]  # another recipe: fitted again


@pytest.mark.slow
def test_distill_demo_writes_valid_conversations_from_the_fitted_teacher(
    tmp_path: Path, data_dir: Path
) -> None:
    """``python tools/distill.py`` on the embedded defaults: a non-empty distill_chatml.jsonl per mission whose
    answers a model wrote (the fitted tiny Teacher), each one valid under the Stage-B contract."""
    run = tmp_path / "run"
    command = [sys.executable, str(REPO / "tools" / "distill.py"), f"hydra.run.dir={run}",
               f"paths.data_dir={data_dir}", "logger=none"]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["distill/rows"] > 0 and metrics["runner/converged"] == 1.0
    files = sorted((run / "stage_b").glob("*/distill_chatml.jsonl"))
    assert len(files) == 4
    for path in files:
        rows = read_jsonl(path)
        assert rows, path
        for row in rows:
            summaries = [line.split(": ", 1)[1] for line in row["messages"][1]["content"].splitlines()
                         if line.startswith("图片_")]  # fmt: skip
            assert parse_verdict(row["messages"][2]["content"], summaries).valid
    assert (data_dir / "synthetic" / "tiny_teacher" / "config.json").is_file()  # cached beside the data
