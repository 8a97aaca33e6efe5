"""W&B tracking that never blocks: offline unless a key is configured, tables and artifacts as no-ops
when no W&B logger is attached (``logger=none``), and a ``finish`` that is safe to call twice.
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:  # Lightning loads in seconds; config validation uses wandb_offline before it is needed
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


def wandb_offline() -> bool:
    """True unless the user configured W&B: ``WANDB_MODE=online``, ``WANDB_API_KEY`` or a netrc key.

    Reads the netrc file the way W&B does: ``$NETRC`` or ``~/.netrc``, the host of ``WANDB_BASE_URL``
    (default ``api.wandb.ai``), and only an entry with a password counts as a key.
    """
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return False
    return not _netrc_has_key()


def _netrc_has_key() -> bool:
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    try:
        auth = netrc.netrc(str(path)).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def configure_wandb_env() -> None:
    """Environment defaults so ``wandb.init`` can neither prompt nor wait for the network."""
    if wandb_offline():
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "30")


def find_wandb_logger(trainer: Trainer | None) -> WandbLogger | None:
    """The trainer's W&B logger, or None (W&B off); callers then skip W&B-only media."""
    if trainer is None:
        return None
    from lightning.pytorch.loggers import WandbLogger

    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


def log_table(
    trainer: Trainer | None, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """Log a W&B table (rank 0 only); a no-op without a W&B logger."""
    logger = find_wandb_logger(trainer)
    if logger is None or not trainer.is_global_zero or not rows:
        return
    logger.log_table(key=key, columns=list(columns), data=[list(r) for r in rows], step=trainer.global_step)


def log_images(trainer: Trainer | None, images: Mapping[str, str | Path]) -> None:
    """Log image files as W&B media, one key each (rank 0 only); a no-op without a W&B logger.

    >>> log_images(trainer, {"test/confusion/bbu_grounding": "run/confusion/bbu_grounding.png"})  # doctest: +SKIP
    """
    logger = find_wandb_logger(trainer)
    if logger is None or not trainer.is_global_zero:
        return
    for key, path in images.items():
        logger.log_image(key=key, images=[str(path)], step=trainer.global_step)


def log_artifact(trainer: Trainer | None, path: str | Path, name: str, artifact_type: str) -> None:
    """Upload a file or folder as a W&B artifact (kept locally when offline); no-op without W&B."""
    logger = find_wandb_logger(trainer)
    if logger is None or not trainer.is_global_zero:
        return
    import wandb

    artifact = wandb.Artifact(name=name, type=artifact_type)
    path = Path(path)
    if path.is_dir():
        artifact.add_dir(str(path))
    else:
        artifact.add_file(str(path))
    logger.experiment.log_artifact(artifact)


def finish_wandb() -> None:
    """Close the active W&B run, if any, with every logged record on disk (``train`` calls it in a ``finally``).

    ``wandb.finish()`` returns once the run's exit is acknowledged, but the W&B service closes the run's
    ``.wandb`` file (which holds only its 7-byte header until then) later, on its own schedule: read right
    after ``finish`` it is often empty, and a job killed then loses the run. ``wandb.teardown()`` waits for
    the service to close every run and exit; the next ``wandb.init`` starts a fresh one.
    """
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency
        return
    if wandb.run is None:
        return
    wandb.finish()
    try:
        wandb.teardown()
    except SystemExit as err:  # teardown exits with the service's exit code when that is not 0
        log.warning("the W&B service exited with code %s while closing the run", err.code)
