"""Config plumbing: where ``conf/`` lives, the custom resolvers, and config validation.

``conf/`` is found in the checkout (``<repo>/conf``) or, in an installed wheel, as the package data
``bbuqc_lightning/conf`` (pyproject maps one to the other).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

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


def register_resolvers() -> None:
    """Resolvers used by the YAML files (idempotent)."""
    if not OmegaConf.has_resolver("bbuqc.wandb_offline"):
        OmegaConf.register_new_resolver("bbuqc.wandb_offline", wandb_offline)


REQUIRED_KEYS = ("stage", "task_name", "seed", "model", "data", "module", "trainer", "paths")
STAGES = ("fit", "validate", "test", "predict")


def validate_config(cfg: DictConfig) -> None:
    """One pass over the composed config; raises one ``ValueError`` listing every problem."""
    problems = [f"missing key '{key}'" for key in REQUIRED_KEYS if key not in cfg]
    if "stage" in cfg and cfg.stage not in STAGES:
        problems.append(f"stage must be one of {STAGES}, got {cfg.stage!r}")
    for group in ("model", "data", "module", "trainer"):
        if group in cfg and (not isinstance(cfg[group], DictConfig) or "_target_" not in cfg[group]):
            problems.append(f"'{group}' needs a _target_ (pick a preset: {group}=<name>)")
    missing = [k for k in _missing_values(cfg)]
    problems += [f"'{k}' has no value (???): set it on the command line, e.g. {k}=..." for k in missing]
    if problems:
        raise ValueError("Invalid configuration:\n  - " + "\n  - ".join(problems))


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
