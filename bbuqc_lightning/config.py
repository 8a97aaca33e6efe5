"""Config plumbing: where ``conf/`` lives, the custom resolvers, and config validation.

``conf/`` is found in the checkout (``<repo>/conf``) or, in an installed wheel, as the package data
``bbuqc_lightning/conf`` (pyproject maps one to the other).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bbuqc_lightning.tracking.wandb import wandb_offline


def config_dir() -> Path:
    """Absolute path of the Hydra config folder (checkout first, then installed package data)."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir.parent / "conf", package_dir / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"No conf/train.yaml next to {package_dir}; reinstall bbuqc_lightning (pip install -e '.[dev]')."
    )


def photo_prompt_len(max_pixels: int, text_tokens: int = 256) -> int:
    """Tokens a one-photo prompt can take: Qwen3-VL's image tokens at ``max_pixels`` (16-pixel patches merged
    2x2: one token per 32x32 pixels) plus ``text_tokens`` for the chat template and the mission prompt
    (the shipped Stage-A prompts take ~180), rounded up to a multiple of 128. 4B preset: 1024."""
    tokens = int(max_pixels) // (32 * 32) + int(text_tokens)
    return -(-tokens // 128) * 128


def loader_workers(limit: int = 8) -> int:
    """DataLoader workers for a photo loop: one per usable CPU core but one (the main process drives the GPU),
    at most ``limit``; 0 on a one-core machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(int(limit), cores - 1))


def register_resolvers() -> None:
    """Resolvers used by the YAML files (idempotent)."""
    if not OmegaConf.has_resolver("bbuqc.wandb_offline"):
        OmegaConf.register_new_resolver("bbuqc.wandb_offline", wandb_offline)
    if not OmegaConf.has_resolver("bbuqc.photo_prompt_len"):
        OmegaConf.register_new_resolver("bbuqc.photo_prompt_len", photo_prompt_len)
    if not OmegaConf.has_resolver("bbuqc.loader_workers"):
        OmegaConf.register_new_resolver("bbuqc.loader_workers", loader_workers)


REQUIRED_KEYS = ("stage", "task_name", "seed", "model", "data", "module", "trainer", "paths")
STAGES = ("fit", "validate", "test", "predict")
# Files and folders a run reads, checked before any model loads (None / missing keys are skipped).
INPUT_PATHS = (
    "data.train_jsonl",
    "data.val_jsonl",
    "data.test_jsonl",
    "data.root",
    "data.guidance_path",
    "module.adapter_path",
    "module.init.adapter",
    "ckpt_path",
)
FILE_INPUTS = ("data.train_jsonl", "data.val_jsonl", "data.test_jsonl", "data.guidance_path", "ckpt_path")
CPU_TRAINER = "trainer=default"


def validate_config(cfg: DictConfig, environment: bool = True) -> None:
    """One pass over the composed config, before anything heavy loads; raises one ``ValueError`` listing
    every problem: structure, values that do not resolve, the typed config blocks (``*Config`` targets,
    whose ``__post_init__`` checks ranges), trainer limits and, with ``environment`` (what ``train`` does),
    this machine: input paths, the model folder and the device. ``environment=False`` checks a config
    composed for a later step (its inputs not written yet) or another machine (a GPU).
    """
    problems = [f"missing key '{key}'" for key in REQUIRED_KEYS if key not in cfg]
    if "stage" in cfg and cfg.stage not in STAGES:
        problems.append(f"stage must be one of {STAGES}, got {cfg.stage!r}")
    for group in ("model", "data", "module", "trainer"):
        if group in cfg and (not isinstance(cfg[group], DictConfig) or "_target_" not in cfg[group]):
            problems.append(f"'{group}' needs a _target_ (pick a preset: {group}=<name>)")
    missing = _missing_values(cfg)
    problems += [f"'{k}' has no value (???): set it on the command line, e.g. {k}=..." for k in missing]
    if not problems:
        resolved, resolve_problems = _resolve(cfg)
        problems += resolve_problems
        if resolved is not None:
            problems += _typed_block_problems(resolved)
            problems += _trainer_problems(resolved.get("trainer") or {}, environment)
            problems += _generation_problems(resolved)
            problems += _path_problems(resolved) if environment else []
    if problems:
        raise ValueError("Invalid configuration: " + "; ".join(problems))


def _resolve(cfg: DictConfig) -> tuple[dict[str, Any] | None, list[str]]:
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        message = str(getattr(err, "msg", None) or err).splitlines()[0]
        return None, [f"{getattr(err, 'full_key', '') or 'config'}: {message}"]
    assert isinstance(container, dict)
    return container, []


def _typed_block_problems(node: Any, where: str = "") -> list[str]:
    """Build every ``bbuqc_lightning.*Config`` block (cheap dataclasses) so their range checks run now."""
    problems: list[str] = []
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str) and target.startswith("bbuqc_lightning.") and target.endswith("Config"):
            kwargs = {k: v for k, v in node.items() if k != "_target_"}
            try:
                get_class(target)(**kwargs)
            except (TypeError, ValueError) as err:
                problems.append(f"{where}: {single_line(str(err))}")
            return problems
        for key, value in node.items():
            problems += _typed_block_problems(value, f"{where}.{key}" if where else str(key))
    return problems


def _generation_problems(resolved: dict[str, Any]) -> list[str]:
    """Every ``*max_new_tokens`` of the module fits the generation pool (``generation.max_new_tokens``)."""
    generation = resolved.get("generation")
    if not isinstance(generation, dict) or generation.get("backend") == "hf":
        return []
    limit = generation.get("max_new_tokens")
    if not isinstance(limit, int):
        return []
    return [
        f"{key}={value} exceeds generation.max_new_tokens={limit} (the pool's longest completion): "
        f"lower it or raise generation.max_new_tokens"
        for key, value in _int_leaves(resolved.get("module"), "module")
        if key.endswith("max_new_tokens") and value > limit
    ]


def _int_leaves(node: Any, where: str) -> list[tuple[str, int]]:
    if isinstance(node, dict):
        return [leaf for key, value in node.items() for leaf in _int_leaves(value, f"{where}.{key}")]
    return [(where, node)] if isinstance(node, int) and not isinstance(node, bool) else []


def _select(container: dict[str, Any], dotted: str) -> Any:
    node: Any = container
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _path_problems(resolved: dict[str, Any]) -> list[str]:
    """Input files that do not exist (the synthetic data set is generated on first use: not checked)."""
    synthetic = _select(resolved, "paths.synthetic_dir")
    generated = Path(synthetic).resolve() if synthetic else None
    problems = []
    for key in INPUT_PATHS:
        value = _select(resolved, key)
        if not isinstance(value, str) or not value or (key == "ckpt_path" and value == "last"):
            continue
        path = Path(value).expanduser().resolve()
        if generated is not None and path.is_relative_to(generated):
            continue
        if not path.exists():
            problems.append(f"{key}={value}: no such file or folder")
        elif key in FILE_INPUTS and not path.is_file():
            problems.append(f"{key}={value}: a folder, not a file")
    return problems + _model_problems(resolved.get("model") or {})


def _model_problems(model: dict[str, Any]) -> list[str]:
    """A local model folder must hold a checkpoint; a hub id is left to the loader (it may be cached)."""
    name = model.get("model_name_or_path")
    if model.get("random_init") or not isinstance(name, str) or not name:
        return []
    folder = Path(name).expanduser()
    looks_local = name.startswith(("/", ".", "~")) or folder.exists()
    if not looks_local:
        return []
    if not folder.is_dir():
        return [f"model.model_name_or_path={name}: no such folder"]
    if not (folder / "config.json").is_file():
        return [
            f"model.model_name_or_path={name}: no config.json in that folder (empty or partial download?)"
        ]
    return []


def _trainer_problems(trainer: dict[str, Any], device: bool) -> list[str]:
    problems = []
    steps = trainer.get("max_steps")
    if isinstance(steps, int) and (steps == 0 or steps < -1):
        problems.append(f"trainer.max_steps must be -1 (no limit) or > 0, got {steps}")
    epochs = trainer.get("max_epochs")
    if isinstance(epochs, int) and epochs < -1:
        problems.append(f"trainer.max_epochs must be -1 (no limit) or >= 0, got {epochs}")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"):
        value = trainer.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            problems.append(f"trainer.{key} must be >= 0, got {value}")
    gpu = str(trainer.get("accelerator", "")).lower() in ("gpu", "cuda")
    if device and gpu and not _cuda_available():
        problems.append(
            f"trainer.accelerator={trainer.get('accelerator')} but no CUDA GPU is visible: "
            f"use the CPU trainer ({CPU_TRAINER}, or drop trainer=gpu / trainer=ddp)"
        )
    return problems


def _cuda_available() -> bool:
    import torch  # only here: the other checks must not wait for torch to load

    return torch.cuda.is_available()


def single_line(message: str) -> str:
    """A possibly multi-line message (``"Title:\n  - a\n  - b"``) as one line (``"Title: a; b"``)."""
    text = ""
    for part in (p.strip().lstrip("- ").strip() for p in message.splitlines()):
        if part:
            text += part if not text else (" " if text.endswith((".", ":", ";")) else "; ") + part
    return text


def _missing_values(cfg: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for key in cfg:
        path = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            out.append(path)
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            out += _missing_values(node, path + ".")
    return out
