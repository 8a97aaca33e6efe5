"""Read a fusion YAML file (SPEC §9): ``targets`` / ``sources`` / ``extends``, validated in one pass.

The shape is the one the team's existing files use, so they load unchanged::

    extends: base.yaml                 # optional; a path or a list of paths, relative to this file
    sample_without_replacement: false  # file-wide defaults, overridable per entry
    fail_oversample: 1.0
    targets:                           # the tasks being trained: round(len x ratio) rows per epoch
      - {name: bbu_summary, dataset: bbu, train_jsonl: bbu_train.jsonl, val_jsonl: bbu_val.jsonl,
         template: summary_bbu, mode: summary, ratio: 1.0}
      - {name: stage_b_distill, dataset: chat, train_jsonl: /runs/x/distill_chatml.jsonl,
         template: chatml, ratio: 1.0, fail_oversample: 2.0}
    # a rare finding drawn more often: rows whose answer matches the regular expression weigh 4 in the draw
    #   {name: bbu_summary, ..., answer_oversample: {match: "不符合要求|无法识别", weight: 4.0}}
    # or a list, most specific first: a row takes the weight of the first pattern its answer matches
    #   answer_oversample: [{match: 弯曲半径不合理, weight: 16.0}, {match: "不符合要求|无法识别", weight: 4.0}]
    sources:                           # auxiliary data: round(ratio x sum of target quotas) rows
      - {name: lang_chat, dataset: chat, train_jsonl: coig_cqia.jsonl, template: chatml, ratio: 0.1}

Decisions:

1. Relative ``train_jsonl`` / ``val_jsonl`` / ``extends`` paths are relative to the file that names them
   (not to the working directory), so a folder of fusion files can be moved as a whole.
2. ``extends`` merges entries *by name*: a child entry with a parent's name overrides only the fields it
   gives (``{name: lang_chat, ratio: 0.0}`` switches a parent source off); new names are appended.
   Values of the child win whole (an ``answer_oversample`` mapping replaces the parent's, it is not merged).
   Several parents merge left to right; a cycle is an error.
3. ``${...}`` interpolations are resolved with OmegaConf against ``variables`` (the data config passes
   ``synthetic_dir`` and ``data_dir``) plus ``oc.env``; files without ``${`` never touch OmegaConf.
4. Unknown keys are logged, not refused (the team's files may carry keys of their older tooling);
   everything else that is wrong is collected and raised at once, each problem as ``file:line``.

Example::

    >>> cfg = load_fusion_config("conf/fusion/default.yaml", {"synthetic_dir": "data/synthetic"})  # doctest: +SKIP
    >>> [e.name for e in cfg.targets]  # doctest: +SKIP
    ['bbu_summary', 'stage_b_distill']
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger(__name__)

DATASETS = ("bbu", "chat")
BBU_MODES = ("summary", "dense")
CHAT_TEMPLATE = "chatml"
ROLES = ("targets", "sources")
ENTRY_KEYS = frozenset(
    {"name", "dataset", "train_jsonl", "val_jsonl", "template", "mode", "ratio"}
    | {"sample_without_replacement", "fail_oversample", "answer_oversample"}
)
FILE_KEYS = frozenset({"extends", "targets", "sources", "sample_without_replacement", "fail_oversample"})
_LINE = "__line__"
_WHERE = "__where__"


class FusionConfigError(ValueError):
    """A fusion file that cannot be used; the message lists every problem as ``file:line: ...``."""


@dataclass(frozen=True)
class FusionEntry:
    """One named data set of the mix (a target or a source), paths already absolute."""

    name: str
    role: Literal["target", "source"]
    dataset: Literal["bbu", "chat"]
    train_jsonl: Path
    val_jsonl: Path | None
    template: str
    mode: str | None
    ratio: float
    sample_without_replacement: bool = False
    fail_oversample: float = 1.0
    # ((regular expression, draw weight), ...): a row's answer takes the weight of the first pattern it matches
    answer_oversample: tuple[tuple[str, float], ...] | None = None
    where: str = "<memory>"


@dataclass(frozen=True)
class FusionConfig:
    """A loaded, validated fusion file: targets first, then sources (sampler and loader order)."""

    path: Path
    targets: tuple[FusionEntry, ...]
    sources: tuple[FusionEntry, ...]

    @property
    def entries(self) -> tuple[FusionEntry, ...]:
        return self.targets + self.sources


def resolve_fusion_path(value: str | Path, conf_dir: Path | None = None) -> Path:
    """A bare name (``default``) means ``conf/fusion/<name>.yaml``; anything else is a file path."""
    text = str(value)
    if "/" not in text and not text.endswith((".yaml", ".yml")):
        if conf_dir is None:
            from bbuqc_lightning.config import config_dir

            conf_dir = config_dir()
        return conf_dir / "fusion" / f"{text}.yaml"
    return Path(text).expanduser()


def load_fusion_config(
    path: str | Path,
    variables: Mapping[str, Any] | None = None,
    bbu_templates: Collection[str] | None = None,
) -> FusionConfig:
    """Load ``path`` with its ``extends`` chain and validate it (``bbu_templates``: the known prompt names).

    Raises :class:`FusionConfigError` listing every problem; ``FileNotFoundError`` for a missing file.
    """
    path = resolve_fusion_path(path)
    merged = _load_tree(path, dict(variables or {}), ())
    return _validate(path, merged, bbu_templates)


# ------------------------------------------------------------------ reading + extends


class _LineLoader(yaml.SafeLoader):
    """A safe YAML loader that records the 1-based line of every mapping (for located errors)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping = loader.construct_mapping(node, deep=True)
    mapping[_LINE] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_file(path: Path, variables: dict[str, Any]) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"fusion file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.load(text, Loader=_LineLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as err:
        raise FusionConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        data = {_LINE: 1}
    if not isinstance(data, dict):
        raise FusionConfigError(f"{path}:1: a fusion file is a mapping with targets/sources, got {data!r}")
    if "${" in text:
        data = _interpolate(path, data, variables)
    for role in ROLES:
        for entry in data.get(role) or []:
            if isinstance(entry, dict):
                entry[_WHERE] = f"{path}:{entry.get(_LINE, '?')}"
                _absolutise(entry, path.parent)
    return data


def _interpolate(path: Path, data: dict[str, Any], variables: dict[str, Any]) -> dict[str, Any]:
    """Resolve ``${var}`` against ``variables`` (file keys win) and ``${oc.env:...}``."""
    try:
        resolved = OmegaConf.to_container(OmegaConf.create({**variables, **data}), resolve=True)
    except OmegaConfBaseException as err:
        known = ", ".join(sorted(variables)) or "none"
        raise FusionConfigError(f"{path}: cannot resolve an interpolation ({err}); known: {known}") from err
    assert isinstance(resolved, dict)
    return {k: v for k, v in resolved.items() if k in data}


def _absolutise(entry: dict[str, Any], folder: Path) -> None:
    for key in ("train_jsonl", "val_jsonl"):
        value = entry.get(key)
        if isinstance(value, str) and value:
            candidate = Path(value).expanduser()
            entry[key] = os.path.normpath(candidate if candidate.is_absolute() else folder / candidate)


def _load_tree(path: Path, variables: dict[str, Any], stack: tuple[Path, ...]) -> dict[str, Any]:
    real = path.resolve()
    if real in stack:
        chain = " -> ".join(str(p) for p in (*stack, real))
        raise FusionConfigError(f"{path}: extends cycle: {chain}")
    data = _read_file(path, variables)
    parents = data.pop("extends", None)
    if isinstance(parents, str):
        parents = [parents]
    if parents is not None and not (isinstance(parents, list) and all(isinstance(p, str) for p in parents)):
        raise FusionConfigError(f"{path}:{data[_LINE]}: extends must be a path or a list of paths")
    merged: dict[str, Any] = {}
    for parent in parents or []:
        parent_path = Path(parent).expanduser()
        parent_path = Path(os.path.normpath(path.parent / parent_path))
        if not parent_path.is_file():
            raise FusionConfigError(f"{path}: extends {parent!r}, but {parent_path} does not exist")
        merged = _merge(merged, _load_tree(parent_path, variables, (*stack, real)))
    return _merge(merged, data)


def _merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Child scalars win; child entries merge into the parent's by name (and may change role)."""
    out = {k: v for k, v in parent.items() if k not in ROLES}
    out.update({k: v for k, v in child.items() if k not in ROLES})
    lists = {role: list(parent.get(role) or []) for role in ROLES}
    inherited = {id(e) for entries in lists.values() for e in entries}
    for role in ROLES:
        if role in child and not isinstance(child[role], list):
            out[role] = child[role]  # left for validation to report
            lists.pop(role, None)
    for role in [r for r in ROLES if r in lists]:
        for entry in child.get(role) or []:
            _merge_entry(lists, inherited, role, entry)
    for role, entries in lists.items():
        if role in parent or role in child:
            out[role] = entries
    return out


def _merge_entry(lists: dict[str, list[Any]], inherited: set[int], role: str, entry: Any) -> None:
    """Override the inherited entry of the same name (only inherited ones: duplicates within one file
    are left for validation to report), else append."""
    name = entry.get("name") if isinstance(entry, dict) else None
    for other_role, entries in lists.items():
        for i, old in enumerate(entries):
            if name is None or id(old) not in inherited or old.get("name") != name:
                continue
            inherited.discard(id(old))
            new = {**old, **entry, _WHERE: f"{entry.get(_WHERE)} (extending {old.get(_WHERE)})"}
            if other_role == role:
                entries[i] = new
            else:
                del entries[i]
                lists[role].append(new)
            return
    lists[role].append(entry)


# ------------------------------------------------------------------ validation


def _validate(path: Path, data: dict[str, Any], bbu_templates: Collection[str] | None) -> FusionConfig:
    problems: list[str] = []
    where = f"{path}:{data.get(_LINE, 1)}"
    unknown = sorted(k for k in data if k not in FILE_KEYS and k != _LINE)
    if unknown:
        log.warning("%s: ignoring unknown fusion keys %s", where, unknown)
    defaults = {
        "sample_without_replacement": _flag(data, "sample_without_replacement", False, where, problems),
        "fail_oversample": _positive(data, "fail_oversample", 1.0, where, problems),
    }
    parsed: dict[str, list[FusionEntry]] = {}
    for role in ROLES:
        raw = data.get(role) or []
        if not isinstance(raw, list):
            problems.append(f"{where}: {role} must be a list of entries, got {type(raw).__name__}")
            raw = []
        parsed[role] = [
            e
            for i, item in enumerate(raw)
            if (e := _entry(item, (where, f"{role}[{i}]"), defaults, bbu_templates, problems)) is not None
        ]
    if not data.get("targets"):
        problems.append(f"{where}: no targets (at least one target entry is needed)")
    names = [e.name for role in ROLES for e in parsed[role]]
    problems += [
        f"{where}: entry name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})
    ]
    if problems:
        raise FusionConfigError(f"invalid fusion file {path}:\n  - " + "\n  - ".join(problems))
    return FusionConfig(path, tuple(parsed["targets"]), tuple(parsed["sources"]))


def _entry(
    raw: Any,
    position: tuple[str, str],
    defaults: dict[str, Any],
    bbu_templates: Collection[str] | None,
    problems: list[str],
) -> FusionEntry | None:
    """One entry, or ``None`` after adding its problems; ``position`` = (file location, ``targets[i]``)."""
    file_where, slot = position
    if not isinstance(raw, dict):
        problems.append(f"{file_where}: {slot} must be a mapping, got {raw!r}")
        return None
    name = raw.get("name")
    where = f"{raw.get(_WHERE, file_where)} ({slot} {name!r})"
    before = len(problems)
    unknown = sorted(k for k in raw if k not in ENTRY_KEYS and k not in (_LINE, _WHERE))
    if unknown:
        log.warning("%s: ignoring unknown entry keys %s", where, unknown)
    if not isinstance(name, str) or not name.strip() or "/" in name:
        problems.append(f"{where}: name must be a non-empty string without '/' (it names metric keys)")
    dataset = raw.get("dataset")
    if dataset not in DATASETS:
        problems.append(f"{where}: dataset must be one of {list(DATASETS)}, got {dataset!r}")
    if not isinstance(raw.get("train_jsonl"), str) or not raw.get("train_jsonl"):
        problems.append(f"{where}: train_jsonl must be a path")
    val = raw.get("val_jsonl")
    if val is not None and not isinstance(val, str):
        problems.append(f"{where}: val_jsonl must be a path or null")
    ratio = _number(raw.get("ratio"))
    if ratio is None or ratio < 0:
        problems.append(f"{where}: ratio must be a number >= 0, got {raw.get('ratio')!r}")
    template, mode = raw.get("template"), raw.get("mode")
    _check_template(where, dataset, template, mode, bbu_templates, problems)
    without = _flag(
        raw, "sample_without_replacement", defaults["sample_without_replacement"], where, problems
    )
    fail_oversample = _positive(raw, "fail_oversample", defaults["fail_oversample"], where, problems)
    answer_oversample = _answer_oversample(raw.get("answer_oversample"), where, problems)
    if len(problems) > before:
        return None
    return FusionEntry(
        name=name,
        role="target" if slot.startswith("targets") else "source",
        dataset=dataset,
        train_jsonl=Path(raw["train_jsonl"]),
        val_jsonl=Path(val) if val else None,
        template=template,
        mode=mode if dataset == "bbu" else None,
        ratio=float(ratio),
        sample_without_replacement=without,
        fail_oversample=fail_oversample,
        answer_oversample=answer_oversample,
        where=str(raw.get(_WHERE, "?")),
    )


def _check_template(
    where: str,
    dataset: Any,
    template: Any,
    mode: Any,
    bbu_templates: Collection[str] | None,
    problems: list[str],
) -> None:
    if dataset == "chat" and template != CHAT_TEMPLATE:
        problems.append(f"{where}: a chat entry needs template: {CHAT_TEMPLATE}, got {template!r}")
    if dataset != "bbu":
        return
    if mode not in BBU_MODES:
        problems.append(f"{where}: a bbu entry needs mode: one of {list(BBU_MODES)}, got {mode!r}")
    if not isinstance(template, str) or (bbu_templates is not None and template not in bbu_templates):
        known = sorted(bbu_templates) if bbu_templates is not None else "a prompt template name"
        problems.append(f"{where}: unknown bbu template {template!r}; known: {known}")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _answer_oversample(value: Any, where: str, problems: list[str]) -> tuple[tuple[str, float], ...] | None:
    """``{match: <regular expression>, weight: <number > 0>}``, or a non-empty list of them (first match wins),
    -> ``((match, weight), ...)``; null -> None."""
    if value is None:
        return None
    shape = "answer_oversample must be {match: <regular expression>, weight: <number > 0>} or a list of them"
    rules = value if isinstance(value, list) else [value]
    if not rules:
        problems.append(f"{where}: {shape}, got an empty list")
        return None
    out: list[tuple[str, float]] = []
    for i, rule in enumerate(rules):
        at = f"answer_oversample[{i}]" if isinstance(value, list) else "answer_oversample"
        if not isinstance(rule, Mapping) or set(rule) - {"match", "weight", _LINE}:
            shown = {k: v for k, v in rule.items() if k != _LINE} if isinstance(rule, Mapping) else rule
            problems.append(f"{where}: {shape}; {at} is {shown!r}")
            return None
        match, weight = rule.get("match"), _number(rule.get("weight"))
        if not isinstance(match, str) or not match:
            problems.append(f"{where}: {shape}; {at}.match is {match!r}")
            return None
        try:
            re.compile(match)
        except re.error as err:
            problems.append(f"{where}: {at}.match {match!r} is not a regular expression ({err})")
            return None
        if weight is None or weight <= 0:
            problems.append(f"{where}: {shape}; {at}.weight is {rule.get('weight')!r}")
            return None
        out.append((match, weight))
    return tuple(out)


def _flag(raw: Mapping[str, Any], key: str, default: bool, where: str, problems: list[str]) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        problems.append(f"{where}: {key} must be true or false, got {value!r}")
        return default
    return value


def _positive(raw: Mapping[str, Any], key: str, default: float, where: str, problems: list[str]) -> float:
    value = _number(raw.get(key, default))
    if value is None or value <= 0:
        problems.append(f"{where}: {key} must be a number > 0, got {raw.get(key)!r}")
        return default
    return value
