"""The one entry point: compose the config, build every object through ``_target_``, run a Lightning stage.

Commands (CPU demo on the embedded tiny model and synthetic data; add ``trainer=gpu`` on a GPU)::

    python -m bbuqc_lightning.train +experiment=grpo       # Stage-B GRPO
    python -m bbuqc_lightning.train +experiment=stage_a    # Stage-A summaries JSONL
    python -m bbuqc_lightning.train +experiment=grpo logger=none trainer.max_steps=2
    python -m bbuqc_lightning.train -m +experiment=grpo module.optimizer.lr=1e-5,5e-6   # Hydra multirun

``train(cfg)`` returns ``(metrics, objects)``; ``main`` returns ``cfg.optimized_metric`` for sweeps.

The command line stays quiet and fails fast: the composition is checked before Hydra runs
(:mod:`bbuqc_lightning.cli`), the config is validated before torch, Lightning or a model load, every
failure is one ``error:`` line (traceback in ``<run>/error.log``), and the resolved config is in
``<run>/.hydra/config.yaml`` (``extras.print_config=true`` prints it).
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from bbuqc_lightning.cli import check_composition, fail, sweep_context
from bbuqc_lightning.config import config_dir, register_resolvers, validate_config
from bbuqc_lightning.constants import GPU_ALLOCATED_KEY, GPU_RESERVED_KEY
from bbuqc_lightning.quiet import quiet_known_warnings

if TYPE_CHECKING:
    import lightning as L

log = logging.getLogger(__name__)


def build_objects(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate callbacks, loggers and trainer (cheap, and Lightning checks its arguments), then the
    model bundle, datamodule and module from ``cfg``."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ProgressBar

    callbacks = [instantiate(c, _convert_="all") for c in (cfg.get("callbacks") or {}).values() if c]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = [instantiate(c, _convert_="all") for c in (cfg.get("logger") or {}).values() if c]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    # a run that only generates ends with its last batch: no trip of the model back to host memory
    if cfg.get("stage") != "fit":
        from bbuqc_lightning.strategy import keep_model_on_device

        keep_model_on_device(trainer)
    bundle = instantiate(cfg.model, _convert_="all", **_random_init_device(cfg, trainer))
    datamodule = instantiate(cfg.data, processor=bundle.processor, _convert_="all")
    module = instantiate(cfg.module, bundle=bundle, _convert_="all")
    return {
        "bundle": bundle,
        "datamodule": datamodule,
        "module": module,
        "callbacks": callbacks,
        "loggers": loggers,
        "trainer": trainer,
    }


def _random_init_device(cfg: DictConfig, trainer: Any) -> dict[str, Any]:
    """``init_device`` for a random-init model on a one-GPU trainer: its weights are drawn there (a 4B model: a
    minute on the host CPU). Multi-device runs keep drawing on the CPU (under ``ddp_spawn`` the model is built
    before the ranks exist)."""
    if not cfg.model.get("random_init") or trainer.num_devices != 1:
        return {}
    device = trainer.strategy.root_device
    return {"init_device": str(device)} if device.type == "cuda" else {}


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Run ``cfg.stage`` of the experiment; W&B is always finished, metrics.json written once it ran."""
    register_resolvers()
    validate_config(cfg)  # before torch, Lightning or a model load, and before metrics.json exists
    announce_config(cfg)
    import lightning as L

    quiet_known_warnings()

    from bbuqc_lightning.tracking.signals import stop_on_signals
    from bbuqc_lightning.tracking.wandb import configure_wandb_env, finish_wandb

    configure_wandb_env()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
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
        metrics = _collect_metrics(trainer, objects["module"]) | skipped_inputs(objects["datamodule"])
        _write_metrics_json(cfg, metrics)  # also after a failure: what was logged so far
    return metrics, objects


def _collect_metrics(trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if _is_scalar(v)}
    # Predict loops cannot self.log(); modules that summarise such a run expose `run_summary`.
    metrics.update(getattr(module, "run_summary", {}))
    metrics.update(gpu_memory_peaks())
    return metrics


def skipped_inputs(datamodule: Any) -> dict[str, float]:
    """The input rows or folders the data module skipped (``data.strict=false``), for metrics.json:
    ``data/skipped`` (fusion rows, Stage-A and end-to-end folders or groups) or ``data/skipped/<split>`` (Stage-B)."""
    skipped = getattr(datamodule, "skipped", None)
    if isinstance(skipped, Mapping):
        return {f"data/skipped/{split}": float(n) for split, n in skipped.items()}
    if isinstance(skipped, list | tuple):
        return {"data/skipped": float(len(skipped))}
    if isinstance(skipped, int) and not isinstance(skipped, bool):
        return {"data/skipped": float(skipped)}
    return {}


def gpu_memory_peaks() -> dict[str, float]:
    """This process's peak GPU memory on its current device, in GiB: what its tensors held at most
    (:data:`GPU_ALLOCATED_KEY`) and what the caching allocator held from the card (:data:`GPU_RESERVED_KEY`:
    ``nvidia-smi`` shows that plus the CUDA context, ~0.5 GiB). Empty when CUDA was never used, or when the
    context is too broken to answer (this runs in ``train``'s ``finally``: it must not hide the run's error)."""
    import torch

    try:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return {}
        gib = float(2**30)
        return {
            GPU_ALLOCATED_KEY: torch.cuda.max_memory_allocated() / gib,
            GPU_RESERVED_KEY: torch.cuda.max_memory_reserved() / gib,
        }
    except Exception:
        log.warning("GPU memory peaks not readable; metrics.json goes without them", exc_info=True)
        return {}


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


def announce_config(cfg: DictConfig) -> None:
    """One line pointing at the saved config; the whole tree only with ``extras.print_config=true``."""
    if cfg.get("extras", {}).get("print_config", False):
        print(OmegaConf.to_yaml(cfg, resolve=False))
    saved = Path(cfg.paths.output_dir) / ".hydra" / "config.yaml"
    where = saved if saved.is_file() else Path(cfg.paths.output_dir)
    log.info("%s (%s): config in %s", cfg.get("task_name"), cfg.get("stage"), where)


def train_or_exit(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """``train(cfg)`` for command lines: any failure prints one ``error:`` line and exits 2.

    The traceback goes to ``<run folder>/error.log``; ``HYDRA_FULL_ERROR=1`` raises it instead.
    """
    import os

    try:
        return train(cfg)
    except Exception as err:
        # Only a run that started can be Interrupted (it imported the module); a configuration error must not wait
        # for the ~8 s Lightning import that importing the module would cost.
        signals = sys.modules.get("bbuqc_lightning.tracking.signals")
        if signals is not None and isinstance(
            err, signals.Interrupted
        ):  # SIGTERM / SIGINT: exit 128 + signal
            print(f"error: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(err, cfg.paths.output_dir)


_LOOP_OF_PREFIX = {"val": "validation", "train": "training", "test": "test"}


def optimized_value(cfg: DictConfig, metrics: dict[str, float], hydra_mode: str | None) -> float | None:
    """``cfg.optimized_metric``'s value. Never logged: a warning line for a plain run (it did its work),
    an ``error:`` line and exit 2 where a sweeper needs the value."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name in metrics:
        return metrics[name]
    prefix = name.split("/")[0]
    why = (
        f"optimized_metric {name!r} was not logged (no '{prefix}/' metric was: did the run reach a "
        f"{_LOOP_OF_PREFIX.get(prefix, prefix)} step? e.g. trainer.max_steps >= trainer.val_check_interval)"
    )
    needed_by = sweep_context(hydra_mode)
    if needed_by:
        fail(f"{why}; the {needed_by} needs it")
    log.warning("%s", why)
    return None


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the value of ``cfg.optimized_metric`` for sweeps."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.get("extras", {}).get("ignore_warnings", False):
        warnings.filterwarnings("ignore")
    metrics = train_or_exit(cfg)[0]
    # A multirun's next job runs in this process: free this one's model and KV pool before it loads its own.
    # Lightning's objects refer to each other in cycles, which only the cycle collector frees, and since a run
    # that does not train keeps its model on the GPU (bbuqc_lightning.strategy) nothing else would.
    gc.collect()
    return optimized_value(cfg, metrics, HydraConfig.get().mode.name)


def main() -> None:
    """``python -m bbuqc_lightning.train`` / ``bbuqc-train``: composition checked first, then Hydra."""
    check_composition(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
