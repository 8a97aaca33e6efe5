"""Synthetic BBU-QC data: the business rules of SPEC §2 and the scene model they are applied to.

Why: tests, demos and smoke runs need labelled groups whose labels *follow from* what the photos show,
so a model can in principle learn them. A scene is structured data (:class:`SceneObject` inside
:class:`ImageScene` inside :class:`GroupScene`); both the reference summary (SPEC §4 grammar) and the
drawing (:mod:`bbuqc_lightning.data.synthetic.render`) are derived from it, so text and pixels never disagree,
and the label is computed from the summaries by :func:`judge_group`, never chosen independently.
:func:`generate_synthetic` writes the SPEC §3 tree (with the naming quirks of field data) and the
matching Stage-A reference JSONL.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Final, NamedTuple

from bbuqc_lightning.constants import (
    COUNT_MARK,
    IRRELEVANT_IMAGE,
    MISSIONS,
    OBJECT_SEPARATOR,
    REMARK_PREFIX,
)


class Vocab:
    """The summary vocabulary (SPEC §4): every Chinese type/attribute string the generator emits.

    Kept as one table so the grammar, the rules and the renderer all refer to the same values.
    """

    BBU = "BBU设备"
    BAFFLE = "挡风板"
    PART = "螺丝、光纤插头"
    FIBRE = "光纤"
    WIRE = "电线"
    LABEL = "标签"
    # Brand as written in the summary -> text printed on the drawn unit (the default font has no CJK).
    BRANDS: Final[dict[str, str]] = {"华为": "HUAWEI", "中兴": "ZTE", "爱立信": "ERICSSON", "诺基亚": "NOKIA"}
    COMPLETE = "显示完整"
    PARTIAL = "只显示部分"
    NO_NEED = "无需安装"
    NEED = "机柜空间充足需要安装"
    FITTED = "这个BBU设备按要求配备了挡风板"
    NOT_FITTED = "这个BBU设备未按要求配备挡风板"
    DIR_OK = "安装方向正确"
    DIR_BAD = "安装方向错误"
    MOUNT_SCREW = "BBU安装螺丝"
    BBU_PLUG = "BBU端光纤插头"
    ODF_PLUG = "ODF端光纤插头"
    CABINET_SCREW = "机柜处接地螺丝"
    BAR_SCREW = "地排处接地螺丝"
    OK = "符合要求"
    NOT_OK = "不符合要求"
    DEFECTS: Final[tuple[str, ...]] = ("未拧紧", "露铜", "复接", "生锈")
    PROTECTED = "有保护措施"
    UNPROTECTED = "无保护措施"
    RADIUS_OK = "弯曲半径合理"
    RADIUS_BAD = "弯曲半径不合理"
    SLEEVES: Final[tuple[str, ...]] = ("蛇形管", "铠装")
    TIDY = "捆扎整齐"
    MESSY = "分布散乱"
    READABLE = "可以识别"
    UNREADABLE = "无法识别"
    # Conservative policy: a remark with one of these means a key element could not be confirmed.
    UNCERTAIN: Final[tuple[str, ...]] = ("无法判断", "模糊", "遮挡")
    UNCERTAIN_REMARKS: Final[dict[str, tuple[str, ...]]] = {
        "bbu_installation": ("BBU安装螺丝被线缆遮挡", "图片模糊无法判断螺丝是否拧紧"),
        "bbu_grounding": ("地排处接地螺丝被遮挡", "接地线连接处模糊"),
        "bbu_cabling": ("光纤弯曲处被遮挡无法判断弯曲半径", "ODF端光纤插头模糊"),
        "baffle_installation": ("无法判断是否有足够空间安装挡风板", "挡风板区域被遮挡"),
    }
    NEUTRAL_REMARKS: Final[tuple[str, ...]] = ("机柜内另有传输设备", "拍摄角度为正面", "现场光线充足")


V = Vocab
_OBJECT_RE: Final = re.compile(
    r"^(?P<kind>[^/，×]+)/(?P<attrs>[^/，×]+)(?:/(?P<cond>[^/，×]+))?×(?P<count>[1-9]\d*)$"
)


@dataclass(frozen=True)
class SceneObject:
    """One summary object: ``类型/属性[,属性][/条件属性]×count`` (e.g. three compliant mounting screws)."""

    kind: str
    attrs: tuple[str, ...]
    conditional: tuple[str, ...] = ()
    count: int = 1

    def has(self, value: str) -> bool:
        return value in self.attrs or value in self.conditional

    def is_(self, what: str) -> bool:
        """True for the object type (``光纤``) or, for parts, the part name (``BBU安装螺丝``)."""
        return self.kind == what or (self.kind == V.PART and self.attrs[0] == what)

    def summary(self) -> str:
        text = f"{self.kind}/{','.join(self.attrs)}"
        if self.conditional:
            text += "/" + ",".join(self.conditional)
        return f"{text}{COUNT_MARK}{self.count}"


@dataclass(frozen=True)
class ImageScene:
    """One photo: objects in visual order plus an optional remark; no objects = an irrelevant photo."""

    objects: tuple[SceneObject, ...] = ()
    remark: str | None = None

    @property
    def irrelevant(self) -> bool:
        return not self.objects

    def summary(self) -> str:
        if self.irrelevant:
            return IRRELEVANT_IMAGE
        items = [obj.summary() for obj in self.objects]
        if self.remark:
            items.append(REMARK_PREFIX + self.remark)
        return OBJECT_SEPARATOR.join(items)


@dataclass(frozen=True)
class GroupScene:
    """One ticket: its mission, its photos and the label the rules give it."""

    mission: str
    label: str
    images: tuple[ImageScene, ...]

    def summaries(self) -> list[str]:
        return [image.summary() for image in self.images]


def parse_summary(summary: str) -> tuple[list[SceneObject], str | None]:
    """Parses one SPEC §4 summary into objects and remark; raises ``ValueError`` on anything else.

    The remark is found by its prefix rather than by splitting, because free text may contain ``，``.
    """
    if summary == IRRELEVANT_IMAGE:
        return [], None
    if not summary or "\n" in summary:
        raise ValueError(f"summary must be one non-empty line: {summary!r}")
    head, remark = summary, None
    if summary.startswith(REMARK_PREFIX):
        head, remark = "", summary[len(REMARK_PREFIX) :]
    elif (pos := summary.find(OBJECT_SEPARATOR + REMARK_PREFIX)) >= 0:
        head, remark = summary[:pos], summary[pos + len(OBJECT_SEPARATOR + REMARK_PREFIX) :]
    objects = []
    for item in head.split(OBJECT_SEPARATOR) if head else []:
        match = _OBJECT_RE.match(item)
        if match is None:
            raise ValueError(f"object {item!r} does not match 类型/属性[/条件]×N in {summary!r}")
        cond = tuple(match["cond"].split(",")) if match["cond"] else ()
        objects.append(
            SceneObject(match["kind"], tuple(match["attrs"].split(",")), cond, int(match["count"]))
        )
    if not objects:
        raise ValueError(f"summary has no object: {summary!r}")
    return objects, remark


# ---------------------------------------------------------------- rules (SPEC §2)


def _check_confirmed(objs: Sequence[SceneObject], what: str, good: tuple[str, ...]) -> list[str]:
    """A key element must be seen complete with all ``good`` values, never partial or with a bad value."""
    found = [o for o in objs if o.is_(what)]
    reasons = (
        [] if any(o.has(V.COMPLETE) and all(o.has(g) for g in good) for o in found) else [f"missing:{what}"]
    )
    if any(o.has(V.PARTIAL) for o in found):
        reasons.append(f"partial:{what}")
    if any(o.has(V.NOT_OK) or o.has(V.DIR_BAD) for o in found):
        reasons.append(f"non_compliant:{what}")
    return reasons


def _rules_installation(objs: Sequence[SceneObject]) -> list[str]:
    return _check_confirmed(objs, V.BBU, ()) + _check_confirmed(objs, V.MOUNT_SCREW, (V.OK,))


def _rules_grounding(objs: Sequence[SceneObject]) -> list[str]:
    reasons = _check_confirmed(objs, V.CABINET_SCREW, (V.OK,)) + _check_confirmed(objs, V.BAR_SCREW, (V.OK,))
    wires = [o for o in objs if o.is_(V.WIRE)]
    if not any(o.has(V.TIDY) for o in wires) or any(o.has(V.MESSY) for o in wires):
        reasons.append("wires_not_bundled")
    return reasons


def _rules_cabling(objs: Sequence[SceneObject]) -> list[str]:
    reasons = _check_confirmed(objs, V.BBU_PLUG, (V.OK,)) + _check_confirmed(objs, V.ODF_PLUG, (V.OK,))
    fibres = [o for o in objs if o.is_(V.FIBRE)]
    if not fibres:
        reasons.append(f"missing:{V.FIBRE}")
    if any(not (o.has(V.PROTECTED) and o.has(V.RADIUS_OK)) for o in fibres):
        reasons.append("fibre_unprotected_or_tight_bend")
    if any(o.is_(V.LABEL) and o.has(V.UNREADABLE) for o in objs):
        reasons.append("label_unreadable")
    return reasons


def _rules_baffle(objs: Sequence[SceneObject]) -> list[str]:
    """Where a baffle is needed it must be fitted the right way; where 无需安装 the BBU checks decide."""
    reasons = _check_confirmed(objs, V.BBU, ())
    bbus = [o for o in objs if o.is_(V.BBU)]
    if not any(o.has(V.NEED) or o.has(V.NO_NEED) for o in bbus):
        reasons.append("baffle_need_unknown")
    if any(o.has(V.NOT_FITTED) for o in bbus):
        reasons.append("baffle_not_fitted")
    baffles = [o for o in objs if o.is_(V.BAFFLE)]
    if any(o.has(V.NEED) for o in bbus) or baffles:
        reasons += _check_confirmed(objs, V.BAFFLE, (V.DIR_OK,))
    return reasons


_RULES: Final[dict[str, Callable[[Sequence[SceneObject]], list[str]]]] = {
    "bbu_installation": _rules_installation,
    "bbu_grounding": _rules_grounding,
    "bbu_cabling": _rules_cabling,
    "baffle_installation": _rules_baffle,
}


def explain_group(mission: str, summaries: Sequence[str]) -> list[str]:
    """Why a group fails under the SPEC §2 rules (short reason codes); empty means it passes.

    Conservative policy: a remark saying a key element is 无法判断/模糊/遮挡 fails the group, and so does
    a key element seen only partially (只显示部分) — the team would rather re-inspect than pass blindly.
    """
    if mission not in MISSIONS:
        raise ValueError(f"unknown mission {mission!r}; expected one of {list(MISSIONS)}")
    objects: list[SceneObject] = []
    reasons: list[str] = []
    for summary in summaries:
        objs, remark = parse_summary(summary)
        objects += objs
        if remark and any(token in remark for token in V.UNCERTAIN):
            reasons.append("uncertain_remark")
    return reasons + _RULES[MISSIONS[mission]](objects)


def judge_group(mission: str, summaries: Sequence[str]) -> str:
    """The synthetic ground truth: ``"pass"`` when no rule of SPEC §2 is violated, else ``"fail"``."""
    return "fail" if explain_group(mission, summaries) else "pass"


# ---------------------------------------------------------------- scene generation


def _part(rng: random.Random, name: str) -> SceneObject:
    return SceneObject(V.PART, (name, V.COMPLETE, V.OK), (), rng.randint(1, 4))


def _bbu(rng: random.Random, need: str | None) -> SceneObject:
    attrs = (rng.choice(list(V.BRANDS)), V.COMPLETE) + ((need,) if need else ())
    return SceneObject(V.BBU, attrs, (V.FITTED,) if need == V.NEED else ())


def _base_facts(rng: random.Random, slug: str) -> list[SceneObject]:
    """The key elements of a compliant ticket of this mission (defects are injected afterwards)."""
    if slug == "bbu_installation":
        return [_bbu(rng, rng.choice((None, V.NO_NEED))), _part(rng, V.MOUNT_SCREW)]
    if slug == "bbu_grounding":
        tidy = SceneObject(V.WIRE, (V.TIDY,), (), rng.randint(1, 3))
        return [_part(rng, V.CABINET_SCREW), _part(rng, V.BAR_SCREW), tidy]
    if slug == "bbu_cabling":
        fibre = SceneObject(V.FIBRE, (V.PROTECTED, V.RADIUS_OK), (rng.choice(V.SLEEVES),), rng.randint(1, 3))
        facts = [_part(rng, V.BBU_PLUG), _part(rng, V.ODF_PLUG), fibre]
        return facts + (
            [SceneObject(V.LABEL, (V.READABLE,), (), rng.randint(1, 6))] if rng.random() < 0.6 else []
        )
    need = rng.choice((V.NEED, V.NEED, V.NO_NEED))
    bbu = _bbu(rng, need)
    if need == V.NO_NEED:
        return [bbu]
    return [bbu, SceneObject(V.BAFFLE, (bbu.attrs[0], V.COMPLETE, V.DIR_OK), (), 1)]


def _distractors(rng: random.Random, slug: str) -> list[SceneObject]:
    """Objects that do not matter for this mission, so the rules have to be read per mission."""
    pool = [SceneObject(V.LABEL, (V.READABLE,), (), rng.randint(1, 6))]
    if slug in ("bbu_installation", "baffle_installation"):
        pool.append(SceneObject(V.LABEL, (V.UNREADABLE,), (), rng.randint(1, 3)))
        pool.append(SceneObject(V.WIRE, (rng.choice((V.TIDY, V.MESSY)),), (), rng.randint(1, 3)))
    if slug != "bbu_cabling":
        pool.append(SceneObject(V.FIBRE, (V.PROTECTED, V.RADIUS_OK), (rng.choice(V.SLEEVES),), 1))
    return rng.sample(pool, k=rng.randint(0, min(2, len(pool))))


class _Defect(NamedTuple):
    """Turns a compliant ticket into a failing one: ``action`` on the objects that are ``target``."""

    target: str
    action: str  # partial | non_compliant | drop | flip | uncertain | nothing
    old: str = ""
    new: str = ""


_DEFECTS: Final[dict[str, tuple[_Defect, ...]]] = {
    "bbu_installation": (
        _Defect(V.MOUNT_SCREW, "non_compliant"),
        _Defect(V.MOUNT_SCREW, "non_compliant"),
        _Defect(V.MOUNT_SCREW, "partial"),
        _Defect(V.BBU, "partial"),
        _Defect(V.BBU, "drop"),
    ),
    "bbu_grounding": (
        _Defect(V.CABINET_SCREW, "non_compliant"),
        _Defect(V.BAR_SCREW, "non_compliant"),
        _Defect(V.BAR_SCREW, "drop"),
        _Defect(V.CABINET_SCREW, "partial"),
        _Defect(V.WIRE, "flip", V.TIDY, V.MESSY),
    ),
    "bbu_cabling": (
        _Defect(V.BBU_PLUG, "non_compliant"),
        _Defect(V.ODF_PLUG, "non_compliant"),
        _Defect(V.ODF_PLUG, "drop"),
        _Defect(V.FIBRE, "flip", V.RADIUS_OK, V.RADIUS_BAD),
        _Defect(V.FIBRE, "unprotect"),
        _Defect(V.LABEL, "flip", V.READABLE, V.UNREADABLE),
    ),
    "baffle_installation": (
        _Defect(V.BAFFLE, "drop"),
        _Defect(V.BAFFLE, "flip", V.DIR_OK, V.DIR_BAD),
        _Defect(V.BAFFLE, "partial"),
        _Defect(V.BBU, "partial"),
    ),
}
_GENERIC_DEFECTS: Final = (_Defect("*", "uncertain"), _Defect("*", "nothing"))


def _apply_one(rng: random.Random, obj: SceneObject, defect: _Defect) -> SceneObject | None:
    """The defective version of one targeted object (``None`` = the object is not in any photo)."""
    if defect.action == "drop":
        return None
    if defect.action == "partial":
        return replace(obj, attrs=tuple(V.PARTIAL if a == V.COMPLETE else a for a in obj.attrs))
    if defect.action == "non_compliant":
        attrs = tuple(V.NOT_OK if a == V.OK else a for a in obj.attrs)
        return replace(obj, attrs=attrs, conditional=(rng.choice(V.DEFECTS),))
    if defect.action == "unprotect":
        return replace(obj, attrs=(V.UNPROTECTED, *obj.attrs[1:]), conditional=())
    return replace(obj, attrs=tuple(defect.new if a == defect.old else a for a in obj.attrs))


def _inject(rng: random.Random, slug: str, facts: list[SceneObject]) -> tuple[list[SceneObject], str | None]:
    """Applies one random defect; a baffle that is dropped also flips its BBU to 未按要求配备."""
    defect = rng.choice(_DEFECTS[slug] + _GENERIC_DEFECTS)
    if defect.action == "uncertain":
        return facts, rng.choice(V.UNCERTAIN_REMARKS[slug])
    if defect.action == "nothing":
        return [], None
    out = [obj if not obj.is_(defect.target) else _apply_one(rng, obj, defect) for obj in facts]
    if defect.target == V.BAFFLE and defect.action == "drop":
        out = [replace(o, conditional=(V.NOT_FITTED,)) if o and o.has(V.FITTED) else o for o in out]
    return [o for o in out if o is not None], None


def _distribute(
    rng: random.Random, objects: list[SceneObject], remark: str | None, n_images: int
) -> tuple[ImageScene, ...]:
    """Spreads objects over photos (at most 4 each); an empty photo repeats an object or shows a document."""
    slots: list[list[SceneObject]] = [[] for _ in range(n_images)]
    for i, obj in enumerate(rng.sample(objects, k=len(objects))):
        free = [s for s in slots if len(s) < 4]
        (slots[i] if i < n_images else rng.choice(free)).append(obj)
    for slot in slots:
        if not slot and objects and rng.random() < 0.7:
            slot.append(rng.choice(objects))
    filled = [i for i, s in enumerate(slots) if s]
    remark_at = rng.choice(filled) if remark and filled else -1
    return tuple(ImageScene(tuple(s), remark if i == remark_at else None) for i, s in enumerate(slots))


def generate_group(mission: str, target: str, rng: random.Random, max_images: int = 6) -> GroupScene:
    """A random ticket of ``mission`` whose rule-derived label is ``target`` (2..``max_images`` photos).

    Scenes are drawn until :func:`judge_group` agrees with ``target`` (a defect may not apply to a
    given scene, e.g. flipping a label that is absent), so the label is always the rules' verdict.
    """
    slug = MISSIONS[mission]
    for _ in range(100):
        facts, remark = _base_facts(rng, slug), None
        if target == "fail":
            facts, remark = _inject(rng, slug, facts)
        if remark is None and rng.random() < 0.15:
            remark = rng.choice(V.NEUTRAL_REMARKS)
        images = _distribute(rng, facts + _distractors(rng, slug), remark, rng.randint(2, max_images))
        group = GroupScene(mission, target, images)
        if judge_group(mission, group.summaries()) == target:
            return group
    raise RuntimeError(f"could not generate a {target} group for {mission}")  # pragma: no cover
