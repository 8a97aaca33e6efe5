"""The Hydra tree: every option of every group composes and resolves, every experiment is a valid run
config, validation reports every problem at once, and the command line fails with clear messages."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE
from typing import Any

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, get_method
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from bbuqc_lightning.config import STAGES, config_dir, validate_config

ComposeFn = Callable[[list[str]], DictConfig]
REPO_ROOT = config_dir().parent


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (config_dir() / group).glob("*.yaml"))


EXPERIMENTS = options("experiment")
MODEL_BUILDERS = {  # the factory, and the demo's fitted tiny Teacher (which builds through it)
    "bbuqc_lightning.models.factory.load_model",
    "bbuqc_lightning.stage_b_runner.tiny_teacher.load_tiny_teacher",
}
GROUP_OPTIONS = [
    (group, option)
    for group in ("model", "logger", "trainer", "callbacks", "debug")
    for option in options(group)
]
# Text-only presets (the Teacher) have no pixel bounds; the default data group (Stage-A images) reads
# ${model.min_pixels}, so with them only the rest of the tree can resolve.
TEXT_PRESETS = {
    name
    for name in options("model")
    if OmegaConf.load(config_dir() / "model" / f"{name}.yaml").kind == "text"
}


def resolve(cfg: DictConfig, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Resolve every key (the Hydra node is registered, so ``${hydra:...}`` works) except ``skip``."""
    kept = OmegaConf.masked_copy(cfg, [key for key in cfg if key not in skip])
    container = OmegaConf.to_container(kept, resolve=True, throw_on_missing=False)
    assert isinstance(container, dict)
    return container


def assert_file_values_applied(node: Any, file_node: Any, where: str) -> None:
    """Every literal leaf of a config file (not ``defaults``, not interpolations) is in the composed node."""
    if isinstance(file_node, DictConfig):
        for key in file_node:
            if key == "defaults":
                continue
            assert key in node, f"{where}.{key} missing from the composed config"
            if OmegaConf.is_interpolation(file_node, key):
                continue
            assert_file_values_applied(node[key], file_node[key], f"{where}.{key}")
    elif isinstance(file_node, ListConfig):
        assert list(node) == list(file_node), where
    else:
        assert node == file_node, f"{where}: {node!r} != {file_node!r}"


# --------------------------------------------------------------------------- composition
def test_default_config_resolves_into_tmp(compose: ComposeFn, tmp_path: Path, data_dir: Path) -> None:
    cfg = compose([])
    resolved = resolve(cfg)
    assert resolved["paths"]["output_dir"] == str(tmp_path / "run")
    assert resolved["trainer"]["default_root_dir"] == str(tmp_path / "run")
    assert resolved["data"]["root"] == str(data_dir / "synthetic" / "test")
    assert resolved["data"]["max_pixels"] == resolved["model"]["max_pixels"] == 65536
    assert resolved["logger"]["wandb"]["offline"] is True  # WANDB_MODE=offline in tests
    assert resolved["stage"] in STAGES
    validate_config(cfg)


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes_and_resolves(compose: ComposeFn, group: str, option: str) -> None:
    cfg = compose([f"{group}={option}"])
    assert HydraConfig.get().runtime.choices[group] == option
    skip = ("data",) if group == "model" and option in TEXT_PRESETS else ()
    resolved = resolve(cfg, skip=skip)
    file_cfg = OmegaConf.load(config_dir() / group / f"{option}.yaml")
    if group == "debug":  # `# @package _global_`
        assert_file_values_applied(cfg, file_cfg, "")
    else:
        assert_file_values_applied(cfg[group], file_cfg, group)
    if group == "model":
        assert resolved["model"]["_target_"] in MODEL_BUILDERS
        assert resolved["model"]["seed"] == resolved["seed"]
        assert get_method(resolved["model"]["_target_"])
    if group in ("logger", "callbacks"):
        for name, spec in (resolved[group] or {}).items():
            assert get_class(spec["_target_"]), f"{group}.{name}"
    if group == "trainer":
        assert resolved["trainer"]["_target_"] == "lightning.pytorch.Trainer"
    needs_gpu = group == "trainer" and resolved["trainer"]["accelerator"] in ("gpu", "cuda")
    if needs_gpu and not _cuda():
        with pytest.raises(
            ValueError, match=r"no CUDA GPU is visible: use the CPU trainer \(trainer=default"
        ):
            validate_config(cfg)
    elif not skip:  # a text model with the default (image) data is not a valid run; its experiments are
        validate_config(cfg)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_logger_none_and_csv(compose: ComposeFn) -> None:
    assert not compose(["logger=none"]).logger
    assert set(compose(["logger=csv"]).logger) == {"csv"}
    assert set(compose(["logger=wandb"]).logger) == {"wandb", "csv"}


def test_callbacks_none_leaves_no_callbacks(compose: ComposeFn) -> None:
    assert not compose(["callbacks=none"]).get("callbacks")


def test_fast_dev_run_turns_loggers_off(compose: ComposeFn) -> None:
    cfg = compose(["debug=fdr"])
    assert cfg.trainer.fast_dev_run is True
    assert not cfg.logger


# --------------------------------------------------------------------------- experiments
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_resolves_and_validates(compose: ComposeFn, experiment: str) -> None:
    cfg = compose([f"+experiment={experiment}"])
    resolved = resolve(cfg)
    assert HydraConfig.get().runtime.choices["experiment"] == experiment
    file_cfg = OmegaConf.load(config_dir() / "experiment" / f"{experiment}.yaml")
    assert_file_values_applied(cfg, file_cfg, "")
    assert resolved["stage"] in STAGES
    assert resolved["task_name"] == experiment
    validate_config(cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_file_header(experiment: str) -> None:
    """STYLE.md: `# @package _global_`, then a comment with the exact command that runs the file."""
    text = (config_dir() / "experiment" / f"{experiment}.yaml").read_text(encoding="utf-8")
    assert text.splitlines()[0] == "# @package _global_"
    assert f"python -m bbuqc_lightning.train +experiment={experiment}" in text


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_targets_are_importable(compose: ComposeFn, experiment: str) -> None:
    """Every `_target_` names something that exists (modules still being written are skipped by name)."""
    resolved = resolve(compose([f"+experiment={experiment}"]))
    for target in _targets(resolved):
        module_name, _, attr = target.rpartition(".")
        module = pytest.importorskip(module_name, reason=f"{module_name} (for {target}) is not written yet")
        assert hasattr(module, attr), f"{target}: {module_name} has no {attr}"


def _targets(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield node["_target_"]
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


# --------------------------------------------------------------------------- validation
def test_validate_config_reports_every_problem_at_once(compose: ComposeFn) -> None:
    cfg = compose([])
    with open_dict(cfg):
        cfg.stage = "bogus"
        del cfg.module["_target_"]
        cfg.data.root = "???"
        del cfg["paths"]
    with pytest.raises(ValueError) as info:
        validate_config(cfg)
    message = str(info.value)
    assert message.startswith("Invalid configuration:")
    assert "stage must be one of ('fit', 'validate', 'test', 'predict'), got 'bogus'" in message
    assert "'module' needs a _target_" in message
    assert "'data.root' has no value (???)" in message
    assert "missing key 'paths'" in message
    assert message.count("; ") == 3  # four problems, one line


def test_an_input_file_setting_given_a_folder_is_named(compose: ComposeFn, tmp_path: Path) -> None:
    cfg = compose(["+experiment=eval", f"data.test_jsonl={tmp_path}", f"data.guidance_path={tmp_path}"])
    with pytest.raises(ValueError) as info:
        validate_config(cfg)
    assert f"data.test_jsonl={tmp_path}: a folder, not a file" in str(info.value)
    assert f"data.guidance_path={tmp_path}: a folder, not a file" in str(info.value)


# --------------------------------------------------------------------------- the command line
CLI_CASES = {
    "unknown_experiment": ["+experiment=nope"],
    "misspelt_experiment": ["+experiment=grpoo"],
    "misspelt_key": ["+experiment=grpo", "trainer.max_step=3"],
    "bad_value": ["stage=bogus", "logger=none"],
    "bad_range": ["+experiment=grpo", "module.grpo.learning_rate=-1e-5", "logger=none"],
    "gpu_without_cuda": ["+experiment=grpo", "trainer=gpu", "logger=none"],
    "empty_model_folder": ["+experiment=grpo", "model.random_init=false", "model.model_name_or_path=."],
    "experiment_without_plus": ["experiment=stage_a"],
}


@dataclass(frozen=True)
class CliRun:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path


def run_in_process(args: list[str], cwd: Path, compose_at: Callable[..., DictConfig]) -> CliRun:
    """What ``python -m bbuqc_lightning.train <args>`` does up to its error, in this process: the composition
    check (``main``), then ``train_or_exit`` on the composed config, run folder ``cwd/run``, from ``cwd``."""
    from bbuqc_lightning.cli import check_composition
    from bbuqc_lightning.train import train_or_exit

    stdout, stderr, returncode = io.StringIO(), io.StringIO(), 0
    with pytest.MonkeyPatch.context() as patch:
        for key in ("HYDRA_FULL_ERROR", "PROJECT_ROOT", "BBUQC_DATA_DIR"):
            patch.delenv(key, raising=False)
        patch.chdir(cwd)
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                check_composition(args)
                train_or_exit(compose_at(args, cwd, cwd / "data"))
        except SystemExit as exit_:
            returncode = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            HydraConfig.instance().cfg = None
    return CliRun(returncode, stdout.getvalue(), stderr.getvalue(), cwd)


def run_processes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CliRun]:
    """Run the failing commands in parallel (each pays the torch import once), each in a scratch folder."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PROJECT_ROOT", "BBUQC_DATA_DIR")
    }
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        WANDB_MODE="offline",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    procs = {}
    for name, args in CLI_CASES.items():
        cwd = tmp_path_factory.mktemp(name)
        command = [sys.executable, "-m", "bbuqc_lightning.train", *args]
        procs[name] = (cwd, subprocess.Popen(command, cwd=cwd, env=env, stdout=PIPE, stderr=PIPE, text=True))
    results = {}
    for name, (cwd, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        results[name] = CliRun(proc.returncode, stdout, stderr, cwd)
    return results


@pytest.fixture(scope="module", params=["in_process", pytest.param("processes", marks=pytest.mark.slow)])
def cli_runs(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    compose_at: Callable[..., DictConfig],
) -> dict[str, CliRun]:
    """Each failing command line, run as the command line runs it: in this process in the default run, as
    real ``python -m bbuqc_lightning.train`` processes under ``-m slow``. (One real process of a bad value
    is in the default run too: ``test_first_hour.py::test_a_wrong_setting_is_reported_without_loading_torch``.)"""
    if request.param == "processes":
        return run_processes(tmp_path_factory)
    return {
        name: run_in_process(args, tmp_path_factory.mktemp(name), compose_at)
        for name, args in CLI_CASES.items()
    }


def _no_traceback(result: CliRun) -> None:
    assert "Traceback (most recent call last)" not in result.stderr
    assert "Traceback (most recent call last)" not in result.stdout


def one_error_line(result: CliRun) -> str:
    """The run failed with exit 2 and printed exactly one line, ``error: ...``, and no traceback."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    _no_traceback(result)
    return errors[0]


def test_unknown_experiment_lists_the_available_ones(cli_runs: dict[str, CliRun]) -> None:
    line = one_error_line(cli_runs["unknown_experiment"])
    assert "no experiment 'nope'" in line
    assert f"(options: {', '.join(EXPERIMENTS)})" in line
    assert (
        len((cli_runs["unknown_experiment"].stdout + cli_runs["unknown_experiment"].stderr).splitlines()) == 1
    )


def test_misspelt_experiment_names_the_closest(cli_runs: dict[str, CliRun]) -> None:
    assert "did you mean +experiment=grpo?" in one_error_line(cli_runs["misspelt_experiment"])


def test_an_experiment_name_that_begins_an_existing_one_points_to_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``+experiment=stage_b`` (the runner's earlier name) names ``stage_b_runner``, not the closer ``stage_a``."""
    from bbuqc_lightning.cli import check_composition

    with pytest.raises(SystemExit) as exit_info:
        check_composition(["+experiment=stage_b"])
    assert exit_info.value.code == 2
    assert "did you mean +experiment=stage_b_runner?" in capsys.readouterr().err


def test_misspelt_key_names_the_closest(cli_runs: dict[str, CliRun]) -> None:
    line = one_error_line(cli_runs["misspelt_key"])
    assert "no config key 'trainer.max_step'; did you mean trainer.max_steps?" in line


@pytest.mark.parametrize(
    ("override", "hint"),
    [("modle=tiny", "did you mean model=tiny?"), ("modle=nothing", "did you mean module?")],
)
def test_a_misspelt_group_with_one_of_its_options_names_the_group(
    override: str, hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``modle=tiny`` is spelt as close to ``module`` as to ``model``; ``tiny`` is a ``model`` option."""
    from bbuqc_lightning.cli import check_composition

    with pytest.raises(SystemExit) as exit_info:
        check_composition(["+experiment=grpo", override])
    assert exit_info.value.code == 2
    assert f"no config key 'modle'; {hint}" in capsys.readouterr().err


def test_out_of_range_value_is_one_line_before_any_run_output(cli_runs: dict[str, CliRun]) -> None:
    """Validation runs before the model loads and before the run folder gets a metrics file."""
    result = cli_runs["bad_range"]
    line = one_error_line(result)
    assert "module.grpo: Invalid GRPOConfig" in line and "learning_rate must be > 0, got -1e-05" in line
    assert "\\n" not in line and "full_key" not in line
    assert not list(result.cwd.rglob("metrics.json"))
    assert len(list(result.cwd.rglob("error.log"))) == 1


def test_gpu_trainer_without_cuda_names_the_cpu_trainer(cli_runs: dict[str, CliRun]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: trainer=gpu is valid here")
    line = one_error_line(cli_runs["gpu_without_cuda"])
    assert "no CUDA GPU is visible" in line and "trainer=default" in line


def test_empty_model_folder_is_one_line(cli_runs: dict[str, CliRun]) -> None:
    line = one_error_line(cli_runs["empty_model_folder"])
    assert "model.model_name_or_path=.: no config.json in that folder" in line
    assert not list(cli_runs["empty_model_folder"].cwd.rglob("metrics.json"))


def test_bad_value_exits_2_with_one_error_line(cli_runs: dict[str, CliRun]) -> None:
    result = cli_runs["bad_value"]
    one_error_line(result)
    assert "stage must be one of" in result.stderr
    assert "'bogus'" in result.stderr
    _no_traceback(result)
    # The traceback is kept in the run folder (under the command's working directory), named on stderr.
    logs = list(result.cwd.rglob("error.log"))
    assert len(logs) == 1
    assert str(logs[0]) in result.stderr
    assert "Traceback (most recent call last)" in logs[0].read_text(encoding="utf-8")


def test_experiment_without_plus_is_a_hydra_error(cli_runs: dict[str, CliRun]) -> None:
    """`experiment=stage_a` (no `+`) is rejected: `experiment` is not in train.yaml's defaults list, and
    Hydra says how to append it. Users must type `+experiment=...` (SPEC §11)."""
    result = cli_runs["experiment_without_plus"]
    assert result.returncode != 0
    assert "Could not override 'experiment'. No match in the defaults list." in result.stderr
    assert "+experiment=stage_a" in result.stderr
    _no_traceback(result)
