"""A tolerant parser of the SPEC §4 summary grammar, for scoring generated summaries.

A summary line is objects separated by ``，``, each ``类型/属性[,属性][/条件属性]×N``, then an optional
``备注: <free text>``; a photo without site equipment is exactly ``无关图片``. Unlike the strict parser of
the synthetic data (``data/synthetic/scenes.py``), this one never raises: a model's output is scored as it is,
and an item that does not follow the grammar is kept as an *unparsed* item (it can match nothing, so it
costs precision without crashing an evaluation).

Attribute order inside an object is kept as written (it is part of the grammar), and so is object order
(the grammar orders objects visually); the scorer decides what order matters for (see
:mod:`bbuqc_lightning.summaries.scoring`).

>>> line = parse_summary("标签/可以识别×2，光纤/有保护措施,弯曲半径合理/蛇形管×1，备注: 现场光线充足")
>>> [o.key() for o in line.objects]
[('标签', ('可以识别',), (), 2), ('光纤', ('有保护措施', '弯曲半径合理'), ('蛇形管',), 1)]
>>> line.remark
'现场光线充足'
>>> parse_summary("无关图片").irrelevant
True
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from bbuqc_lightning.constants import COUNT_MARK, IRRELEVANT_IMAGE, OBJECT_SEPARATOR, REMARK_PREFIX

# ``类型/属性[,属性][/条件[,条件]]×N``: the count is a positive integer after ``×``.
_OBJECT_RE: Final = re.compile(
    rf"^(?P<kind>[^/{COUNT_MARK}]+)/(?P<attrs>[^/{COUNT_MARK}]+)(?:/(?P<cond>[^/{COUNT_MARK}]+))?"
    rf"{COUNT_MARK}(?P<count>[1-9][0-9]*)$"
)
# The remark prefix as models write it: ``备注:`` or ``备注：``, with or without a space.
_REMARK_RE: Final = re.compile(r"^备注[:：]\s*")
_REMARK_KIND: Final[str] = REMARK_PREFIX.split(":")[0]  # "备注"
# A model may use the ASCII comma between objects; only where an object ends (``×N,``) is it a separator.
_ASCII_SEPARATOR_RE: Final = re.compile(rf"({COUNT_MARK}[0-9]+)\s*[,;；]\s*")


@dataclass(frozen=True)
class SummaryObject:
    """One object of a summary line: type, attributes, conditional attributes and count."""

    kind: str
    attributes: tuple[str, ...]
    conditional: tuple[str, ...] = ()
    count: int = 1

    def key(self) -> tuple[str, tuple[str, ...], tuple[str, ...], int]:
        """What must be equal for two objects to match (everything, count included)."""
        return (self.kind, self.attributes, self.conditional, self.count)


@dataclass(frozen=True)
class ParsedSummary:
    """A parsed line: objects in written order, the remark (or ``None``) and the items that did not parse."""

    objects: tuple[SummaryObject, ...]
    remark: str | None = None
    unparsed: tuple[str, ...] = ()
    irrelevant: bool = False

    def items(self) -> list[tuple[object, ...]]:
        """Everything the line asserts, as comparable keys: objects, the remark and unparsed items.

        The remark is one item (``("备注", text)``): it can decide a verdict (an uncertain key element
        fails the ticket), so it is scored like an object. An unparsed item gets a key that no reference
        item has, so it counts as a wrong item.
        """
        keys: list[tuple[object, ...]] = [o.key() for o in self.objects]
        if self.remark is not None:
            keys.append((_REMARK_KIND, self.remark))
        keys.extend(("<unparsed>", text) for text in self.unparsed)
        return keys


def parse_object(item: str) -> SummaryObject | None:
    """One ``类型/属性[/条件]×N`` item, or ``None`` when it does not follow the grammar.

    >>> parse_object("螺丝、光纤插头/BBU安装螺丝,显示完整,不符合要求/生锈×3").conditional
    ('生锈',)
    >>> parse_object("两根光纤") is None
    True
    """
    match = _OBJECT_RE.match(item.strip())
    if match is None:
        return None
    split = _split_values
    return SummaryObject(
        kind=match["kind"].strip(),
        attributes=split(match["attrs"]),
        conditional=split(match["cond"]) if match["cond"] else (),
        count=int(match["count"]),
    )


def _split_values(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_summary(line: str) -> ParsedSummary:
    """Parse one summary line (see the module docstring); never raises."""
    text = " ".join(line.split())  # a stray line break or double space is not worth a mismatch
    if text == IRRELEVANT_IMAGE:
        return ParsedSummary(objects=(), irrelevant=True)
    head, remark = _split_remark(text)
    objects: list[SummaryObject] = []
    unparsed: list[str] = []
    for item in _split_items(head):
        parsed = parse_object(item)
        if parsed is None:
            unparsed.append(item)
        else:
            objects.append(parsed)
    return ParsedSummary(objects=tuple(objects), remark=remark, unparsed=tuple(unparsed))


def _split_remark(text: str) -> tuple[str, str | None]:
    """``(objects part, remark)``: the remark starts at the first ``备注:`` item (free text may hold ``，``)."""
    items = text.split(OBJECT_SEPARATOR)
    for index, item in enumerate(items):
        if _REMARK_RE.match(item.strip()):
            remark = OBJECT_SEPARATOR.join(items[index:]).strip()
            return OBJECT_SEPARATOR.join(items[:index]), _REMARK_RE.sub("", remark).strip() or None
    return text, None


def _split_items(head: str) -> list[str]:
    """Object items of the line: split on ``，`` (and on ``,``/``;`` right after a count, a common slip)."""
    normalised = _ASCII_SEPARATOR_RE.sub(rf"\1{OBJECT_SEPARATOR}", head)
    return [item.strip() for item in normalised.split(OBJECT_SEPARATOR) if item.strip()]
