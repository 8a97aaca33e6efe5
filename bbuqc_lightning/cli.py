"""The command line's contract: every failure is one ``error:`` line, and it comes fast.

- :func:`check_composition` composes the command line's overrides with Hydra's compose API *before*
  ``@hydra.main`` runs, so a misspelt experiment, group option or key is one line naming the closest
  existing name (Hydra itself prints a 15-line report), in well under a second.
- :func:`one_line` turns any exception into that line (Hydra's ``InstantiationException`` is unwrapped to
  its cause; multi-line messages are joined with ``; ``); :func:`fail` prints it, keeps the traceback
  in ``error.log`` and exits 2.
- :func:`sweep_context` says whether a sweeper needs the run's return value (Hydra multirun, W&B agent).

Only the standard library and Hydra are imported here: this runs before torch or Lightning load.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

from bbuqc_lightning.config import config_dir, register_resolvers, single_line

EXIT_CONFIG_ERROR = 2
_MULTIRUN_FLAGS = ("-m", "--multirun")
_FLAGS_WITH_VALUE = ("-c", "--cfg", "-p", "--package", "--info", "--experimental-rerun")
# Help, another config, shell completion: Hydra's own business.
_SKIP_FLAGS = ("-h", "--help", "--hydra-help", "-cn", "--config-name", "-cp", "--config-path", "-cd",
               "--config-dir", "-sc", "--shell-completion", "--experimental-rerun")  # fmt: skip


def one_line(err: BaseException) -> str:
    """The exception as one line: ``InstantiationException`` unwrapped, lines joined with ``; ``."""
    from hydra.errors import InstantiationException

    key = ""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        key = getattr(err, "full_key", "") or key
        err = err.__cause__
    message = str(err).strip() or type(err).__name__
    if type(err).__module__.startswith("omegaconf"):
        key = getattr(err, "full_key", "") or key
        message = str(getattr(err, "msg", message))
    kept = [p for p in message.splitlines() if not p.strip().startswith(("full_key:", "object_type="))]
    text = single_line("\n".join(kept))
    return f"{key}: {text}" if key and not text.startswith(key) else text


def fail(err: BaseException | str, output_dir: str | Path | None = None) -> NoReturn:
    """Print ``error: <one line>`` (and where the traceback is), keep the traceback, exit 2."""
    message = err if isinstance(err, str) else one_line(err)
    where = ""
    if output_dir is not None and isinstance(err, BaseException):
        trace = Path(output_dir) / "error.log"
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.write_text("".join(traceback.format_exception(err)), encoding="utf-8")
        where = f" (traceback: {trace})"
    print(f"error: {message}{where}", file=sys.stderr)
    sys.exit(EXIT_CONFIG_ERROR)


def sweep_context(hydra_mode: str | None) -> str | None:
    """Who needs ``optimized_metric``: ``"Hydra multirun"``, ``"W&B sweep agent"`` or nobody (None)."""
    if hydra_mode == "MULTIRUN":
        return "Hydra multirun"
    if os.environ.get("WANDB_SWEEP_ID"):
        return "W&B sweep agent"
    return None


def check_composition(argv: Sequence[str], config_name: str = "train") -> None:
    """Compose ``argv``'s overrides as ``@hydra.main`` will; a composition error exits with one line.

    Flags (``--help``, ``-m``, ``--cfg``...) are left to Hydra. Under ``-m`` each swept override is checked
    with its first value. ``HYDRA_FULL_ERROR=1`` skips the check, so Hydra's own report shows.
    """
    if os.environ.get("HYDRA_FULL_ERROR") == "1" or any(a.split("=")[0] in _SKIP_FLAGS for a in argv):
        return
    overrides = _overrides_of(argv)
    try:
        if any(a in _MULTIRUN_FLAGS for a in argv):
            overrides = _first_of_each_sweep(overrides)
        _compose(overrides, config_name)
    except MissingConfigException as err:
        fail(_missing_option_message(err, overrides))
    except OverrideParseException as err:
        fail(f"cannot parse the overrides: {one_line(err)}")
    except ConfigCompositionException as err:
        fail(_override_message(err, overrides, config_name))


def _overrides_of(argv: Sequence[str]) -> list[str]:
    """The positional overrides of a Hydra command line (flags and their values left out)."""
    overrides, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg in _FLAGS_WITH_VALUE:
            skip_next = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides


def _compose(overrides: list[str], config_name: str) -> DictConfig:
    register_resolvers()
    with hydra.initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra.compose(config_name, overrides=overrides)


def _first_of_each_sweep(overrides: list[str]) -> list[str]:
    """``a=1,2`` -> ``a=1`` (and ranges, globs... to their first value) for a multirun's check."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()), None)
            out.append(f"{override.get_key_element()}={first}")
        else:
            out.append(override.input_line or "")
    return out


def _missing_option_message(err: MissingConfigException, overrides: list[str]) -> str:
    """``+experiment=grpoo`` -> no experiment 'grpoo'; did you mean +experiment=grpo? (all options)."""
    missing = str(err.missing_cfg_file or "")
    group, _, name = missing.rpartition("/")
    options = list(err.options or [])
    if not group or not options:
        return one_line(err).split("; Config search path")[0]
    prefix = next((o.split(group, 1)[0] for o in overrides if o.lstrip("+~").startswith(f"{group}=")), "")
    # a name that begins an option (stage_b -> stage_b_runner) beats a closer spelling (stage_a)
    closest = [o for o in options if o.startswith(name)][:1] or difflib.get_close_matches(
        name, options, n=1, cutoff=0.4
    )
    hint = f"; did you mean {prefix}{group}={closest[0]}?" if closest else ""
    return f"no {group} '{name}'{hint} (options: {', '.join(options)})"


def _override_message(err: ConfigCompositionException, overrides: list[str], config_name: str) -> str:
    """Hydra's message on one line, plus the closest existing key for a misspelt ``a.b=...``."""
    message = one_line(err)
    match = re.search(r"Could not override '([^']+)'\.\s*(?:;\s*)?To append to your config", message)
    if not match:
        return message
    key = match.group(1)
    rest = [o for o in overrides if not o.lstrip("+~").startswith(f"{key}=")]
    try:
        keys = _dotted_keys(_compose(rest, config_name))
    except Exception:  # the other overrides fail too: Hydra's message is all we have
        return message
    value = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+~").startswith(f"{key}=")), "")
    group = _group_with_option(key, value)
    if group:  # modle=tiny: the value names an option of a group spelt like the key
        return f"no config key '{key}'; did you mean {group}={value}?"
    closest = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f"did you mean {closest[0]}?" if closest else f"to add a new key write +{key}=..."
    return f"no config key '{key}'; {hint}"


def _group_with_option(key: str, value: str) -> str | None:
    """The config group spelt most like ``key`` that has an option ``value`` (``conf/<group>/<value>.yaml``)."""
    if "." in key or not value:
        return None
    groups = [d.name for d in config_dir().iterdir() if d.is_dir() and (d / f"{value}.yaml").is_file()]
    closest = difflib.get_close_matches(key, groups, n=1, cutoff=0.6)
    return closest[0] if closest else None


def _dotted_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg:
        path = f"{prefix}{key}"
        keys.append(path)
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not OmegaConf.is_interpolation(cfg, key):
            keys += _dotted_keys(node, path + ".")
    return keys
