"""W&B sweep files (``conf/sweeps/*.yaml``): each is a valid sweep whose parameters exist in the composed
experiment, one sampled configuration runs through the exact command a W&B agent would build (in this
process; as an agent's own process under ``-m slow``), and a Hydra multirun over the same parameters
(the command line's ``main()`` in this process; a real process under ``-m slow``) writes one run folder per
value."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE
from typing import Any

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from bbuqc_lightning.cli import check_composition
from bbuqc_lightning.config import config_dir
from bbuqc_lightning.data.synthetic.tree import ensure_synthetic
from bbuqc_lightning.train import main as train_main
from bbuqc_lightning.train import train

REPO_ROOT = config_dir().parent
SWEEPS = sorted(path.stem for path in (config_dir() / "sweeps").glob("*.yaml"))
ENTRY = ["${env}", "${interpreter}", "-m", "bbuqc_lightning.train"]
METHODS = ("grid", "random", "bayes")
DISTRIBUTIONS = {
    "uniform",
    "log_uniform_values",
    "int_uniform",
    "q_uniform",
    "q_log_uniform_values",
    "normal",
}

# Tiny limits appended after the sampled parameters (later overrides win). The learning-rate monitor is
# dropped because it refuses to run without a logger.
TINY_COMMON = [
    "logger=none",
    "++callbacks.learning_rate_monitor=null",
    "trainer.max_steps=1",
    "trainer.val_check_interval=1",
    "trainer.limit_val_batches=1",
    "extras.print_config=false",
]
TINY = {
    "grpo": [
        "module.grpo.max_new_tokens=4",
        "data.limit_samples=4",
        "data.batch_size=2",
        "data.val_batch_size=4",
    ],
    "fusion_sft": [],
}
MULTIRUN_SWEEP = "grpo"


def load_sweep(name: str) -> dict[str, Any]:
    sweep = yaml.safe_load((config_dir() / "sweeps" / f"{name}.yaml").read_text(encoding="utf-8"))
    assert isinstance(sweep, dict)
    return sweep


def experiment_of(sweep: dict[str, Any]) -> str:
    [token] = [t for t in sweep["command"] if str(t).startswith("+experiment=")]
    return token.split("=", 1)[1]


def parameter_problems(name: str, spec: Any, method: str) -> list[str]:
    """W&B's parameter forms: ``value``, ``values`` (non-empty list), or a distribution with min < max."""
    if not isinstance(spec, dict):
        return [f"{name}: expected a mapping, got {spec!r}"]
    if "value" in spec:
        return []
    if "values" in spec:
        return [] if isinstance(spec["values"], list) and spec["values"] else [f"{name}: empty values"]
    if method == "grid":
        return [f"{name}: grid search needs value or values"]
    problems = []
    if spec.get("distribution", "uniform") not in DISTRIBUTIONS:
        problems.append(f"{name}: unknown distribution {spec.get('distribution')!r}")
    if not ("min" in spec and "max" in spec and spec["min"] < spec["max"]):
        problems.append(f"{name}: needs min < max")
    return problems


def sample(spec: dict[str, Any]) -> Any:
    """A deterministic draw: the fixed value, the first of the values, or the low end of the range."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][0]
    return spec["min"]


def agent_command(sweep: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The command a W&B agent runs for ``params`` (wandb's own argument formatting, macros expanded)."""
    sweep_vars: dict[str, list[str]] = create_sweep_command_args(
        {"args": {k: {"value": v} for k, v in params.items()}}
    )
    sweep_vars.update(env=["/usr/bin/env"], interpreter=[sys.executable], program=[sweep["program"]])
    command: list[str] = []
    for token in map(str, sweep["command"]):
        command += sweep_vars[token[2:-1]] if token.startswith("${") and token.endswith("}") else [token]
    return command


# --------------------------------------------------------------------------- the files
def test_there_is_a_sweep_per_trained_experiment() -> None:
    assert {"grpo", "fusion_sft"} <= set(SWEEPS)


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_file_is_a_valid_wandb_sweep(name: str) -> None:
    sweep = load_sweep(name)
    assert {"program", "method", "metric", "parameters", "command"} <= set(sweep)
    assert sweep["method"] in METHODS
    assert isinstance(sweep["metric"]["name"], str) and sweep["metric"]["name"].startswith("val/")
    assert sweep["metric"]["goal"] in ("minimize", "maximize")
    problems = [
        p for key, spec in sweep["parameters"].items() for p in parameter_problems(key, spec, sweep["method"])
    ]
    assert not problems
    command = list(map(str, sweep["command"]))
    assert command[: len(ENTRY)] == ENTRY
    assert command[-1] == "${args_no_hyphens}"
    assert (config_dir() / "experiment" / f"{experiment_of(sweep)}.yaml").is_file()
    assert (REPO_ROOT / sweep["program"]).is_file()
    text = (config_dir() / "sweeps" / f"{name}.yaml").read_text(encoding="utf-8")
    assert text.startswith("#") and f"wandb sweep conf/sweeps/{name}.yaml" in text  # says how to run it


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_parameter_exists_in_the_composed_config(
    name: str, compose: Callable[[list[str]], DictConfig]
) -> None:
    sweep = load_sweep(name)
    cfg = compose([f"+experiment={experiment_of(sweep)}"])
    missing = [
        key for key in sweep["parameters"] if OmegaConf.select(cfg, key, default="<missing>") == "<missing>"
    ]
    assert not missing, f"{name}: not in the composed config (a typo would fail every agent run): {missing}"


# --------------------------------------------------------------------------- running them
@dataclass(frozen=True)
class Run:
    command: list[str]
    returncode: int
    output: str
    folder: Path


def subprocess_env(data_dir: Path) -> dict[str, str]:
    synthetic = OmegaConf.load(config_dir() / "train.yaml").synthetic
    ensure_synthetic(  # generated here, once, not by (possibly parallel) runs
        data_dir / "synthetic", synthetic.seed, dict(synthetic.groups_per_split), list(synthetic.image_size)
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PROJECT_ROOT", "WANDB_SWEEP_ID")}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        BBUQC_DATA_DIR=str(data_dir),
        WANDB_MODE="offline",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HYDRA_FULL_ERROR="1",
    )
    return env


def run_commands(commands: dict[str, tuple[list[str], Path]], env: dict[str, str]) -> dict[str, Run]:
    """Run the commands side by side (each in its own folder's parent) and wait for all of them."""
    if len(commands) > 1:  # the runs share the cores: threads would only wait on each other
        env = {**env, "OMP_NUM_THREADS": "1"}
    procs = {
        name: subprocess.Popen(
            command, cwd=folder.parent, env=env, stdout=PIPE, stderr=subprocess.STDOUT, text=True
        )
        for name, (command, folder) in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=240)
        results[name] = Run(commands[name][0], proc.returncode, output, commands[name][1])
    return results


def sampled_params(sweep: dict[str, Any]) -> dict[str, Any]:
    return {key: sample(spec) for key, spec in sweep["parameters"].items()}


def tiny_overrides(sweep: dict[str, Any]) -> list[str]:
    return [*TINY_COMMON, *TINY.get(experiment_of(sweep), [])]


@pytest.fixture(scope="module")
def agent_runs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Run]:
    """One sampled configuration per sweep, each through the exact command a W&B agent runs (a process)."""
    commands: dict[str, tuple[list[str], Path]] = {}
    for name in SWEEPS:
        sweep = load_sweep(name)
        folder = tmp_path_factory.mktemp(f"sweep_{name}")
        tiny = [*tiny_overrides(sweep), f"hydra.run.dir={folder / 'run'}"]
        commands[name] = (agent_command(sweep, sampled_params(sweep)) + tiny, folder / "run")
    return run_commands(commands, subprocess_env(data_dir))


@pytest.fixture(scope="module")
def multirun(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Run:
    return run_commands(
        {"multirun": multirun_command(tmp_path_factory.mktemp("multirun"))}, subprocess_env(data_dir)
    )["multirun"]


def multirun_command(folder: Path) -> tuple[list[str], Path]:
    """``-m`` with two values of the learning rate (the range ends), every other parameter sampled."""
    sweep = load_sweep(MULTIRUN_SWEEP)
    params = sampled_params(sweep)
    lr = sweep["parameters"]["module.grpo.learning_rate"]
    params["module.grpo.learning_rate"] = f"{lr['min']},{lr['max']}"
    overrides = [f"{key}={value}" for key, value in params.items()]
    command = [sys.executable, "-m", "bbuqc_lightning.train", "-m", f"+experiment={experiment_of(sweep)}"]
    tiny = [*tiny_overrides(sweep), f"hydra.sweep.dir={folder / 'multirun'}"]
    return command + overrides + tiny, folder / "multirun"


def metrics_of(folder: Path) -> dict[str, float]:
    return json.loads((folder / "metrics.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", SWEEPS)
def test_sampled_configuration_runs_and_logs_the_sweep_metric(
    name: str, compose_at: Callable[[list[str], Path, Path], DictConfig], tmp_path: Path, data_dir: Path
) -> None:
    """The agent's command line (wandb's own formatting of the sampled parameters), run as the CLI runs it
    (composition check, then ``train(cfg)``) in this process. As a process of its own: the slow test below."""
    sweep = load_sweep(name)
    params = sampled_params(sweep)
    command = agent_command(sweep, params) + tiny_overrides(sweep)
    assert command[:2] == ["/usr/bin/env", sys.executable]  # ${env} ${interpreter}, as the agent expands them
    argv = command[command.index("bbuqc_lightning.train") + 1 :]
    check_composition(argv)
    cfg = compose_at(argv, tmp_path, data_dir)
    try:
        reached = {key: OmegaConf.select(cfg, key) for key in params}
        assert reached == params  # every sampled parameter reached the run's config
        metrics, _ = train(cfg)
    finally:
        HydraConfig.instance().cfg = None
    metric = sweep["metric"]["name"]
    assert metric in metrics and metric in metrics_of(tmp_path / "run"), sorted(metrics)


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEPS)
def test_sampled_configuration_runs_and_logs_the_sweep_metric_as_an_agent_process(
    name: str, agent_runs: dict[str, Run]
) -> None:
    run = agent_runs[name]
    assert run.returncode == 0, f"{' '.join(run.command)}\n{run.output[-4000:]}"
    metric = load_sweep(name)["metric"]["name"]
    assert metric in metrics_of(run.folder), sorted(metrics_of(run.folder))
    overrides = yaml.safe_load((run.folder / ".hydra" / "overrides.yaml").read_text(encoding="utf-8"))
    assert set(load_sweep(name)["parameters"]) <= {o.split("=", 1)[0] for o in overrides}


def assert_a_folder_per_value(folder: Path) -> None:
    metric = load_sweep(MULTIRUN_SWEEP)["metric"]["name"]
    lr = load_sweep(MULTIRUN_SWEEP)["parameters"]["module.grpo.learning_rate"]
    seen = []
    for job in ("0", "1"):
        assert metric in metrics_of(folder / job)
        config = OmegaConf.load(folder / job / ".hydra" / "config.yaml")
        seen.append(config.module.grpo.learning_rate)
    assert seen == [lr["min"], lr["max"]]
    assert not (folder / "2").exists()


@contextlib.contextmanager
def logging_restored() -> Iterator[None]:
    """Hydra configures logging for itself and each job (handlers on the root logger, some to files): put
    every logger back as it was, so later tests log as before and no handler outlives its stream."""
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers]
    try:
        yield
    finally:
        for lg, handlers, level, propagate, disabled in saved:
            for handler in lg.handlers:
                if handler not in handlers:
                    handler.close()
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled


def test_hydra_multirun_over_a_sweep_parameter_writes_a_folder_per_value(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m bbuqc_lightning.train -m ...`` run by its ``main()`` in this process (Hydra's basic launcher
    runs the jobs one after the other in the calling process). As a process of its own: the slow test below."""
    command, folder = multirun_command(tmp_path)
    env = subprocess_env(data_dir)
    for key in ("PROJECT_ROOT", "WANDB_SWEEP_ID"):
        monkeypatch.delenv(key, raising=False)
    for key in ("BBUQC_DATA_DIR", "HYDRA_FULL_ERROR"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train", *command[command.index("bbuqc_lightning.train") + 1 :]])
    assert sys.argv[1] == "-m"
    try:
        with logging_restored():
            train_main()
    finally:
        HydraConfig.instance().cfg = None
    assert_a_folder_per_value(folder)


@pytest.mark.slow
def test_hydra_multirun_over_a_sweep_parameter_writes_a_folder_per_value_as_a_process(multirun: Run) -> None:
    run = multirun
    assert run.returncode == 0, f"{' '.join(run.command)}\n{run.output[-4000:]}"
    assert_a_folder_per_value(run.folder)
