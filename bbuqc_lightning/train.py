"""The one entry point: compose the config, build every object through ``_target_``, run a Lightning stage.

Commands (CPU demo on the embedded tiny model and synthetic data; add ``trainer=gpu`` on a GPU)::

    python -m bbuqc_lightning.train +experiment=grpo       # Stage-B GRPO
    python -m bbuqc_lightning.train +experiment=stage_a    # Stage-A summaries JSONL
    python -m bbuqc_lightning.train +experiment=grpo logger=none trainer.max_steps=2
    python -m bbuqc_lightning.train -m +experiment=grpo module.optimizer.lr=1e-5,5e-6   # Hydra multirun

``train(cfg)`` returns ``(metrics, objects)``; ``main`` returns ``cfg.optimized_metric`` for sweeps.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bbuqc_lightning.config import config_dir, register_resolvers, validate_config
from bbuqc_lightning.tracking.signals import Interrupted, stop_on_signals
from bbuqc_lightning.tracking.wandb import configure_wandb_env, finish_wandb

log = logging.getLogger(__name__)


# GRPO optimises inside training_step (manual optimisation), so a step's checkpoint holds the weights after
# that step, which is what resuming needs; Lightning warns about it on every run.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def build_objects(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate model bundle, datamodule, module, callbacks, loggers and trainer from ``cfg``."""
    bundle = instantiate(cfg.model, _convert_="all")
    datamodule = instantiate(cfg.data, processor=bundle.processor, _convert_="all")
    module = instantiate(cfg.module, bundle=bundle, _convert_="all")
    callbacks = [instantiate(c, _convert_="all") for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [instantiate(c, _convert_="all") for c in (cfg.get("logger") or {}).values() if c]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return {
        "bundle": bundle,
        "datamodule": datamodule,
        "module": module,
        "callbacks": callbacks,
        "loggers": loggers,
        "trainer": trainer,
    }


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Run ``cfg.stage`` of the experiment; W&B is always finished, metrics.json always written."""
    register_resolvers()
    validate_config(cfg)
    configure_wandb_env()
    L.seed_everything(cfg.seed, workers=True)
    objects = build_objects(cfg)
    trainer: L.Trainer = objects["trainer"]
    try:
        _log_hyperparameters(cfg, objects)
        run = getattr(trainer, cfg.stage)
        kwargs: dict[str, Any] = {"datamodule": objects["datamodule"]}
        if cfg.stage == "fit":
            kwargs["ckpt_path"] = cfg.get("ckpt_path")
        if cfg.stage == "predict":  # outputs are streamed by writer callbacks, not collected in memory
            kwargs["return_predictions"] = False
        with stop_on_signals(trainer) as stopper:  # SIGTERM/SIGINT: finish the item in hand, then stop
            objects["result"] = run(objects["module"], **kwargs)
        stopper.raise_if_stopped()
    finally:
        finish_wandb()
        metrics = _collect_metrics(trainer, objects["module"])
        _write_metrics_json(cfg, metrics)  # also after a failure: what was logged so far
    return metrics, objects


def _collect_metrics(trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if _is_scalar(v)}
    # Predict loops cannot self.log(); modules that summarise such a run expose `run_summary`.
    metrics.update(getattr(module, "run_summary", {}))
    return metrics


def _is_scalar(value: Any) -> bool:
    return getattr(value, "numel", lambda: 1)() == 1


def _log_hyperparameters(cfg: DictConfig, objects: dict[str, Any]) -> None:
    """The resolved config plus parameter counts, to every logger."""
    model = objects["bundle"].model
    params = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "model/params_total": sum(p.numel() for p in model.parameters()),
        "model/params_trainable": sum(p.numel() for p in objects["module"].parameters() if p.requires_grad),
    }
    for logger in objects["loggers"]:
        logger.log_hyperparams(params)


def _write_metrics_json(cfg: DictConfig, metrics: dict[str, float]) -> None:
    out = Path(cfg.paths.output_dir) / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2, ensure_ascii=False, sort_keys=True), encoding="utf-8")
    log.info("metrics written to %s", out)


def _print_config(cfg: DictConfig) -> None:
    if cfg.get("extras", {}).get("print_config", False):
        log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))


def train_or_exit(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """``train(cfg)`` for command lines: configuration and input errors print one ``error:`` line and exit 2.

    The traceback goes to ``<run folder>/error.log``; ``HYDRA_FULL_ERROR=1`` raises it instead.
    """
    try:
        return train(cfg)
    except Interrupted as stop:
        print(f"error: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except (ValueError, OSError, OmegaConfBaseException, InstantiationException) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        trace = Path(cfg.paths.output_dir) / "error.log"
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.write_text(traceback.format_exc(), encoding="utf-8")
        print(f"error: {err}\n(traceback in {trace}; HYDRA_FULL_ERROR=1 raises it)", file=sys.stderr)
        sys.exit(2)


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the value of ``cfg.optimized_metric`` for sweeps."""
    if cfg.get("extras", {}).get("ignore_warnings", False):
        warnings.filterwarnings("ignore")
    _print_config(cfg)
    metrics, _ = train_or_exit(cfg)
    metric_name = cfg.get("optimized_metric")
    if not metric_name:
        return None
    if metric_name not in metrics:
        print(
            f"error: optimized_metric {metric_name!r} was not logged (was validation switched off?); "
            f"logged: {', '.join(sorted(metrics))}",
            file=sys.stderr,
        )
        sys.exit(2)
    return metrics[metric_name]


if __name__ == "__main__":
    main()
