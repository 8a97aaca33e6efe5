"""Stage-A summaries scored against reference summaries (SPEC §6), overall and per mission.

Each generated line and its reference are parsed with the SPEC §4 grammar
(:mod:`bbuqc_lightning.summaries.grammar`) into items — objects ``(type, attributes, conditional attributes,
count)`` plus the remark — and matched as multisets:

- ``stage_a/object_precision`` / ``object_recall`` / ``object_f1``: micro over every item of every image;
  an object matches only when type, every attribute and the count agree (a wrong count or a wrong
  attribute is one missed reference object *and* one wrong generated object); object order does not
  matter here (a reordered line keeps F1 = 1);
- ``stage_a/exact_match``: the whole line equals the reference (order and wording included);
- ``stage_a/irrelevant_accuracy``: share of images where "is this ``无关图片``" is right, both ways;
- ``stage_a/negative_item_recall``: of the seed's negative items in the reference lines
  (:data:`~bbuqc_lightning.constants.NEGATIVE_ITEMS`: 弯曲半径不合理, 不符合要求, 无保护措施, 标签无法识别,
  未按要求配备挡风板; each counted once per image), the share the generated line also names. A summary that
  drops one turns a fail ticket into a false pass downstream, so this bounds the end-to-end false-pass rate;
- each also as ``<name>/<mission slug>``; plus ``stage_a/scored_images``, ``stage_a/scored_groups``,
  ``stage_a/unreferenced_groups`` (generated tickets the reference lacks) and
  ``stage_a/missing_groups`` (reference tickets not generated; not scored, so a partial run is honest).

A rate whose denominator is zero is left out (no key), as for the verdict metrics. References come from a
Stage-A JSONL (the synthetic ``stage_a_<split>.jsonl``) or a team's one-row-per-photo summary file (the
fusion SFT's ``dataset: bbu`` rows, e.g. its summary ``val_jsonl``), see :func:`read_reference`.

Example::

    scores = score_stage_a_files("runs/x/stage_a.jsonl", "data/synthetic/stage_a_test.jsonl")
    scores.metrics()["stage_a/object_f1"], scores.worst(5)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bbuqc_lightning.constants import MISSIONS, NEGATIVE_ITEMS, image_key
from bbuqc_lightning.data.jsonl import iter_jsonl
from bbuqc_lightning.summaries.grammar import parse_summary
from bbuqc_lightning.summaries.records import normalise_stage_a_record

PREFIX = "stage_a/"
# The W&B table of the worst lines: what the reference says, what the model wrote, how far apart.
WORST_COLUMNS: tuple[str, ...] = ("ticket_key", "mission", "image", "f1", "reference", "generated")


@dataclass(frozen=True)
class LineScore:
    """One image: item counts of the match, exact match and whether ``无关图片`` was right."""

    ticket_key: str
    mission: str
    image: str
    reference: str
    generated: str
    matched: int
    generated_items: int
    reference_items: int
    exact: bool
    irrelevant_ok: bool
    negative_reference: int = 0  # negative items the reference names
    negative_found: int = 0  # of those, named by the generated line too

    @property
    def f1(self) -> float:
        """Line F1; with no item on either side (``无关图片``, or nothing generated) 1.0 if the
        irrelevant-photo call is right, else 0.0."""
        total = self.generated_items + self.reference_items
        if total == 0:
            return 1.0 if self.irrelevant_ok else 0.0
        return 2 * self.matched / total

    def table_row(self) -> list[Any]:
        values = {**self.__dict__, "f1": round(self.f1, 4)}
        return [values[c] for c in WORST_COLUMNS]


def score_line(reference: str, generated: str) -> tuple[int, int, int, bool, bool]:
    """``(matched, generated items, reference items, exact, irrelevant right)`` of one image.

    >>> score_line("标签/可以识别×2，电线/捆扎整齐×1", "电线/捆扎整齐×1，标签/可以识别×3")
    (1, 2, 2, False, True)
    """
    ref, gen = parse_summary(reference), parse_summary(generated)
    ref_items, gen_items = Counter(ref.items()), Counter(gen.items())
    matched = sum((ref_items & gen_items).values())
    exact = " ".join(reference.split()) == " ".join(generated.split())
    return matched, sum(gen_items.values()), sum(ref_items.values()), exact, ref.irrelevant == gen.irrelevant


def negative_marks(line: str) -> set[str]:
    """The seed's negative items a summary line names.

    >>> sorted(negative_marks("光纤/无保护措施,弯曲半径合理/蛇形管×1，标签/无法识别×2"))
    ['无保护措施', '标签无法识别']
    """
    return {name for name, mark in NEGATIVE_ITEMS.items() if mark in line}


@dataclass
class _Totals:
    matched: int = 0
    generated: int = 0
    reference: int = 0
    exact: int = 0
    irrelevant_ok: int = 0
    images: int = 0
    negative_reference: int = 0
    negative_found: int = 0

    def add(self, line: LineScore) -> None:
        self.matched += line.matched
        self.generated += line.generated_items
        self.reference += line.reference_items
        self.exact += line.exact
        self.irrelevant_ok += line.irrelevant_ok
        self.images += 1
        self.negative_reference += line.negative_reference
        self.negative_found += line.negative_found

    def rates(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.generated:
            out["object_precision"] = self.matched / self.generated
        if self.reference:
            out["object_recall"] = self.matched / self.reference
        if self.generated + self.reference:
            out["object_f1"] = 2 * self.matched / (self.generated + self.reference)
        if self.images:
            out["exact_match"] = self.exact / self.images
            out["irrelevant_accuracy"] = self.irrelevant_ok / self.images
        if self.negative_reference:
            out["negative_item_recall"] = self.negative_found / self.negative_reference
        return out


@dataclass
class StageAScores:
    """Accumulates line scores group by group; :meth:`metrics` gives the rates, :meth:`worst` the table."""

    missions: Mapping[str, str] = field(default_factory=lambda: dict(MISSIONS))
    lines: list[LineScore] = field(default_factory=list)
    groups: int = 0
    unreferenced_groups: int = 0
    missing_groups: int = 0

    def add_group(
        self,
        ticket_key: str,
        mission: str,
        reference: Mapping[str, str],
        generated: Mapping[str, str],
    ) -> list[LineScore]:
        """Score one group's ``图片_i -> summary`` maps; an image on one side only is scored against ``""``."""
        keys = list(reference) + [k for k in generated if k not in reference]
        scored = []
        for key in keys:
            ref, gen = reference.get(key, ""), generated.get(key, "")
            matched, n_gen, n_ref, exact, irrelevant_ok = score_line(ref, gen)
            negatives = negative_marks(ref)
            scored.append(
                LineScore(
                    ticket_key,
                    mission,
                    key,
                    ref,
                    gen,
                    matched,
                    n_gen,
                    n_ref,
                    exact,
                    irrelevant_ok,
                    len(negatives),
                    len(negatives & negative_marks(gen)),
                )
            )
        self.lines.extend(scored)
        self.groups += 1
        return scored

    def metrics(self, prefix: str = PREFIX) -> dict[str, float]:
        """Rates overall and ``/<slug>`` per configured mission, plus the counts (module docstring)."""
        overall, per_mission = _Totals(), {slug: _Totals() for slug in self.missions.values()}
        for line in self.lines:
            overall.add(line)
            slug = self.missions.get(line.mission)
            if slug is not None:
                per_mission[slug].add(line)
        out = {f"{prefix}{name}": value for name, value in overall.rates().items()}
        for slug, totals in per_mission.items():
            out.update({f"{prefix}{name}/{slug}": value for name, value in totals.rates().items()})
        out.update(
            {
                f"{prefix}scored_images": float(overall.images),
                f"{prefix}scored_groups": float(self.groups),
                f"{prefix}unreferenced_groups": float(self.unreferenced_groups),
                f"{prefix}missing_groups": float(self.missing_groups),
            }
        )
        return out

    def worst(self, n: int) -> list[LineScore]:
        """The ``n`` lines furthest from their reference (lowest F1, then not exact), worst first."""
        return sorted(self.lines, key=lambda line: (line.f1, line.exact, line.ticket_key, line.image))[:n]


def read_summaries(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{ticket_key: normalised Stage-A line}`` of a Stage-A JSONL file (legacy ``image_i`` keys accepted).

    Raises ``ValueError`` naming ``<path>:<line>`` for a malformed line: a reference must be clean.
    """
    rows: dict[str, dict[str, Any]] = {}
    for number, raw in enumerate(iter_jsonl(path), start=1):
        try:
            row = normalise_stage_a_record(raw)
        except ValueError as err:
            raise ValueError(f"{path}: Stage-A line {number}: {err}") from err
        rows[row["ticket_key"]] = row
    return rows


def read_reference(path: str | Path, records: Sequence[Any] = ()) -> dict[str, dict[str, Any]]:
    """Reference summaries by ticket, from a Stage-A JSONL or from a team's summary file.

    A summary file is the fusion SFT's ``dataset: bbu`` shape, one row per photo
    (``{"images": [path], "mission": …, "summary": …}``, relative paths relative to the file's folder); its
    photos are matched to the run's tickets by resolved path, so it needs the scanned ``records``
    (:class:`~bbuqc_lightning.data.tree.GroupRecord`); a ticket is referenced only when every one of its
    photos has a summary row.
    """
    path = Path(path)
    first = next(iter_jsonl(path), None)
    if first is None or "per_image" in first:
        return read_summaries(path)
    by_photo: dict[Path, str] = {}
    for number, row in enumerate(iter_jsonl(path), start=1):
        images, summary = row.get("images"), row.get("summary")
        if not isinstance(images, list) or len(images) != 1 or not isinstance(summary, str):
            raise ValueError(f"{path}:{number}: a summary row needs one image and a 'summary' string")
        photo = Path(images[0]).expanduser()
        by_photo[(photo if photo.is_absolute() else path.parent / photo).resolve()] = summary
    reference = {}
    for record in records:
        photos = [p.resolve() for p in record.image_paths]
        if photos and all(p in by_photo for p in photos):
            per_image = {image_key(i): by_photo[p] for i, p in enumerate(photos, start=1)}
            reference[record.ticket_key] = {"mission": record.mission, "per_image": per_image}
    return reference


def score_records(
    generated: Sequence[Mapping[str, Any]],
    reference: Mapping[str, Mapping[str, Any]],
    scores: StageAScores | None = None,
) -> StageAScores:
    """Add every generated group that has a reference to ``scores`` (a new one by default)."""
    scores = scores if scores is not None else StageAScores()
    seen: set[str] = set()
    for row in generated:
        key = row["ticket_key"]
        ref = reference.get(key)
        if ref is None:
            scores.unreferenced_groups += 1
            continue
        seen.add(key)
        scores.add_group(key, ref["mission"], ref["per_image"], row["per_image"])
    scores.missing_groups += len(set(reference) - seen)
    return scores


def score_stage_a_files(
    generated_jsonl: str | Path,
    reference_jsonl: str | Path,
    missions: Mapping[str, str] | None = None,
    records: Sequence[Any] = (),
) -> StageAScores:
    """Score a Stage-A output file against references of the same tickets (:func:`read_reference`)."""
    generated = list(read_summaries(generated_jsonl).values())
    reference = read_reference(reference_jsonl, records)
    return score_records(generated, reference, StageAScores(dict(missions or MISSIONS)))


def synthetic_reference(data_root: str | Path, synthetic_dir: str | Path) -> Path | None:
    """The synthetic ``stage_a_<split>.jsonl`` when ``data_root`` is the synthetic ``<split>`` tree, else None.

    >>> str(synthetic_reference("data/synthetic/test", "data/synthetic"))
    'data/synthetic/stage_a_test.jsonl'
    >>> synthetic_reference("/data/qc/2025-01", "data/synthetic") is None
    True
    """
    root, synthetic = Path(data_root), Path(synthetic_dir)
    if root.parent.resolve() != synthetic.resolve():
        return None
    return synthetic / f"stage_a_{root.name}.jsonl"


def resolve_reference(
    reference_jsonl: str | None, data_root: str | Path, synthetic_dir: str | Path
) -> Path | None:
    """What ``stage_a.reference_jsonl`` means: ``auto`` (the synthetic split's references when the run reads
    the synthetic tree, else none), ``null`` (no scoring) or a path (which must exist: raises otherwise)."""
    if reference_jsonl in (None, "", "none", "null"):
        return None
    if reference_jsonl == "auto":
        return synthetic_reference(data_root, synthetic_dir)
    path = Path(reference_jsonl)
    if not path.is_file():
        raise FileNotFoundError(f"stage_a.reference_jsonl={path}: no such file")
    return path
