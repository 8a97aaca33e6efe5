"""Shared fixtures: the tiny random Qwen3-VL / Qwen3 bundles, an offline environment, and ``compose``.

``compose(overrides)`` composes the real ``conf/`` tree exactly as ``python -m bbuqc_lightning.train``
would, with every output folder pointed into pytest's temporary directories, so tests never write
into the checkout.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# huggingface_hub reads HF_HUB_OFFLINE once, at import time: set it before anything imports it. The
# autouse fixture below sets it again (with the others) for every test through monkeypatch.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import PreTrainedTokenizerBase

import bbuqc_lightning.models.factory as factory
from bbuqc_lightning.config import config_dir, register_resolvers
from bbuqc_lightning.models.factory import ModelBundle, load_model
from bbuqc_lightning.models.factory import build_tokenizer as real_build_tokenizer

# The tiny models gain nothing from intra-op threads; 2 keeps torch off the other cores of a larger box.
# (Measured on a busy 2-core machine: 1 thread ran test_model_factory.py in half the time of 2.)
TORCH_THREADS = 2
torch.set_num_threads(TORCH_THREADS)

TEST_ENV = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def model_preset(name: str) -> DictConfig:
    """A ``conf/model/<name>.yaml`` file as loaded from disk (no composition, no interpolation)."""
    return OmegaConf.load(config_dir() / "model" / f"{name}.yaml")


def preset_architecture(name: str) -> dict[str, Any]:
    """The ``architecture`` block of a model preset as a plain dict."""
    arch = OmegaConf.to_container(model_preset(name).architecture, resolve=True)
    assert isinstance(arch, dict)
    return arch


@pytest.fixture(autouse=True)
def offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach W&B or the Hugging Face hub, or oversubscribe the CPU."""
    for key, value in TEST_ENV.items():
        monkeypatch.setenv(key, value)
    torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(scope="session", autouse=True)
def parsed_tokenizer_once() -> Iterator[None]:
    """The bundled Qwen3 tokenizer is parsed once per session; every later ``build_tokenizer()`` gets a copy.

    Parsing its 11 MB ``tokenizer.json`` costs ~1 s, and the tests build a model many times (every
    ``train(cfg)``, every tiny-model helper). A copy is the tokenizer ``build_tokenizer`` returned (left padding, pad
    id), with its own Python attributes (a test that sets one changes no other test's tokenizer); the
    compiled vocabulary is shared, and nothing here adds tokens to it. A ``tokenizer_path`` is loaded as
    before.
    """
    built: list[PreTrainedTokenizerBase] = []

    def build_tokenizer(tokenizer_path: str | Path | None = None) -> PreTrainedTokenizerBase:
        if tokenizer_path is not None:
            return real_build_tokenizer(tokenizer_path)
        if not built:
            built.append(real_build_tokenizer())
        clone = copy.copy(built[0])
        for name, value in vars(built[0]).items():
            if isinstance(value, dict | list):
                setattr(clone, name, copy.copy(value))
        return clone

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(factory, "build_tokenizer", build_tokenizer)
        yield


@pytest.fixture(scope="session")
def tiny_architecture() -> dict[str, Any]:
    return preset_architecture("tiny")


@pytest.fixture(scope="session")
def tiny_text_architecture() -> dict[str, Any]:
    return preset_architecture("tiny_text")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_architecture: dict[str, Any]) -> ModelBundle:
    """The tiny random Qwen3-VL of ``conf/model/tiny.yaml`` (shared: tests must not change its weights)."""
    return load_model(kind="vl", random_init=True, architecture=tiny_architecture, seed=0, max_pixels=65536)


@pytest.fixture(scope="session")
def tiny_text_bundle(tiny_text_architecture: dict[str, Any]) -> ModelBundle:
    """The tiny random Qwen3 text model of ``conf/model/tiny_text.yaml`` (shared: do not change it)."""
    return load_model(kind="text", random_init=True, architecture=tiny_text_architecture, seed=0)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``paths.data_dir`` for every composed config: the synthetic data set is generated here once."""
    return tmp_path_factory.mktemp("data")


def compose_config(overrides: list[str], root: Path, data_dir: Path) -> DictConfig:
    """Compose ``train.yaml`` with ``overrides`` as ``@hydra.main`` would hand it to ``train``.

    The run folder is ``root/run``, logs and the working root are under ``root``, data under ``data_dir``.
    ``${hydra:runtime.output_dir}`` resolves because the Hydra node is registered with ``HydraConfig``
    and then removed from the returned config (``@hydra.main`` passes it without that node too).
    """
    register_resolvers()
    with hydra.initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra.compose("train", overrides=list(overrides), return_hydra_config=True)
    output_dir = root / "run"
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
        cfg.paths.root_dir = str(root)
        cfg.paths.log_dir = str(root / "logs")
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.data_dir = str(data_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture
def compose(tmp_path: Path, data_dir: Path) -> Iterator[Callable[[list[str]], DictConfig]]:
    """``compose(overrides) -> cfg`` with the run folder ``tmp_path/run`` (see :func:`compose_config`)."""
    yield lambda overrides: compose_config(overrides, tmp_path, data_dir)
    HydraConfig.instance().cfg = None


def exit_code_of_train(cfg: DictConfig) -> int | str | None:
    """Run ``train_or_exit(cfg)`` (the command line's ``train``), which must end in ``SystemExit``; its code."""
    from bbuqc_lightning.train import train_or_exit

    try:
        with pytest.raises(SystemExit) as stop:
            train_or_exit(cfg)
    finally:
        HydraConfig.instance().cfg = None
    return stop.value.code


@pytest.fixture(scope="session")
def compose_at() -> Callable[[list[str], Path, Path], DictConfig]:
    """:func:`compose_config` itself, for module-scoped fixtures that choose their own folders."""
    return compose_config
