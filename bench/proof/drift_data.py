"""The data side of the drift/cure pipeline: the seed's negative items, the lenient verdict source, the fusion
files of each step, the Teacher's input and output, and false passes split by negative item.

The five negative items of the seed (``../shared/seeds/002``: the unified model "对负项不敏感")::

    弯曲半径不合理 · 不符合要求 · 无保护措施 · 标签/无法识别 · 未按要求配备挡风板

A *lenient source* is a reviewer (or a pseudo-labeller) blind to exactly those items: it passes a ticket
whose every failure reason under the SPEC §2 rules is one of them, and judges everything else as the rules
do (:func:`lenient_label`). Its verdicts are what the ``lenient`` drift trains on.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from bbuqc_lightning.constants import MISSIONS, NEGATIVE_ITEMS, REASON_PREFIXES, VERDICT_PASS
from bbuqc_lightning.data.synthetic.scenes import Vocab, explain_group
from bbuqc_lightning.summaries.scoring import negative_marks

BAFFLE = "挡风板"


def negative_items(summaries: Sequence[str]) -> list[str]:
    """The seed's negative items present in a ticket's summaries, in :data:`NEGATIVE_ITEMS` order.

    >>> negative_items(["光纤/无保护措施,弯曲半径合理/蛇形管×1", "标签/无法识别×2"])
    ['无保护措施', '标签无法识别']
    """
    named = negative_marks("\n".join(summaries))
    return [name for name in NEGATIVE_ITEMS if name in named]


# What a reviewer blind to the negative items reads instead (the compliant wording of the same object).
_BLIND_READING: dict[str, str] = {
    "不符合要求": "符合要求",
    "弯曲半径不合理": "弯曲半径合理",
    "无保护措施": "有保护措施",
    "标签/无法识别": "标签/可以识别",
    "未按要求配备挡风板": "按要求配备了挡风板",
}


def blind_reading(summary: str) -> str:
    """A summary as the lenient source reads it: every negative item in its compliant wording.

    >>> blind_reading("螺丝、光纤插头/BBU安装螺丝,显示完整,不符合要求/生锈×3")
    '螺丝、光纤插头/BBU安装螺丝,显示完整,符合要求/生锈×3'
    """
    for negative, compliant in _BLIND_READING.items():
        summary = summary.replace(negative, compliant)
    return summary


def lenient_label(mission: str, summaries: Sequence[str]) -> str:
    """The lenient source's label: the SPEC §2 rules applied to :func:`blind_reading` of the summaries.

    A baffle that was never fitted is also not missed (the source does not see 未按要求配备挡风板, so it
    does not look for the baffle); every other failure (a missing or partial key element, an uncertain
    remark, 分布散乱, 安装方向错误, ...) fails as the rules say.

    >>> lenient_label("BBU线缆布放要求", ["螺丝、光纤插头/BBU端光纤插头,显示完整,符合要求×1",
    ...     "螺丝、光纤插头/ODF端光纤插头,显示完整,符合要求×1", "光纤/有保护措施,弯曲半径不合理/铠装×1"])
    'pass'
    """
    codes = explain_group(mission, [blind_reading(s) for s in summaries])
    if "未按要求配备挡风板" in negative_items(summaries):
        codes = [code for code in codes if code != f"missing:{BAFFLE}"]
    return "fail" if codes else "pass"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename: a step that runs concurrently and reads ``path`` (both
    seeds' drift steps share one lenient file and one mix) sees the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    write_atomic(path, "".join(lines))
    return len(lines)


def summaries_by_ticket(stage_a_jsonl: Path) -> dict[str, dict[str, Any]]:
    """``{ticket_key: {"mission", "label", "summaries"}}`` of a Stage-A reference file."""
    out = {}
    for row in read_jsonl(stage_a_jsonl):
        summaries = [
            row["per_image"][key] for key in sorted(row["per_image"], key=lambda k: int(k.split("_")[1]))
        ]
        out[row["ticket_key"]] = {"mission": row["mission"], "label": row["label"], "summaries": summaries}
    return out


def pass_answer(repo: Path) -> str:
    """The synthetic data's own pass answer (``conf/prompts/synthetic.yaml``, the phrases the fusion sources
    and the Teacher share), e.g. ``通过`` + newline + ``理由: …。``."""
    texts = yaml.safe_load((repo / "conf" / "prompts" / "synthetic.yaml").read_text(encoding="utf-8"))
    reason = texts["reason_template"].format(reasons=texts["reasons"]["pass"])
    return f"{VERDICT_PASS}\n{REASON_PREFIXES[0]} {reason}"


def write_lenient_stage_b(stage_b_rows: Path, stage_a_jsonl: Path, out: Path, answer: str) -> dict[str, Any]:
    """The Stage-B chat rows with the lenient source's verdicts: a fail ticket that only carries negative
    items gets ``answer`` (the pass answer) and ``label: pass`` (``human_label`` keeps the truth)."""
    tickets = summaries_by_ticket(stage_a_jsonl)
    rows, flipped = [], Counter()
    for row in read_jsonl(stage_b_rows):
        ticket = tickets[row["ticket_key"]]
        lenient = lenient_label(ticket["mission"], ticket["summaries"])
        new = {**row, "human_label": row["label"], "label": lenient}
        if lenient != row["label"]:
            new["messages"] = [*row["messages"][:-1], {"role": "assistant", "content": answer}]
            flipped[MISSIONS[ticket["mission"]]] += 1
        rows.append(new)
    write_jsonl(out, rows)
    fails = sum(r["human_label"] == "fail" for r in rows)
    return {
        "rows": len(rows),
        "fail_rows": fails,
        "passed_by_lenient": dict(flipped),
        "total_passed": sum(flipped.values()),
    }


def fusion_file(
    path: Path, targets: Sequence[Mapping[str, Any]], sources: Sequence[Mapping[str, Any]]
) -> Path:
    """Write a fusion YAML (SPEC §9 shape) with absolute paths; returns its path."""
    body = {"fail_oversample": 1.0, "targets": list(targets), "sources": list(sources)}
    write_atomic(path, yaml.safe_dump(body, allow_unicode=True, sort_keys=False))
    return path


# The words of every finding that can fail a ticket under the SPEC §2 rules in some mission (the seed's five
# negative items among them; 分布散乱 fails cabling, not installation), and the uncertain-remark words of the
# conservative policy.
_OBJECT_FINDINGS = (
    Vocab.RADIUS_BAD,
    Vocab.UNPROTECTED,
    Vocab.UNREADABLE,
    Vocab.NOT_FITTED,
    Vocab.DIR_BAD,
    Vocab.MESSY,
    Vocab.PARTIAL,
)
FINDINGS = (Vocab.NOT_OK, *_OBJECT_FINDINGS, *Vocab.UNCERTAIN)
# What the report counts per finding in the model's own summaries (each a regular expression): the four screw
# defects apart as well (不符合要求 names them all), the uncertain-remark words together as one.
KEPT_FINDINGS = (Vocab.NOT_OK, *Vocab.DEFECTS, *_OBJECT_FINDINGS, "|".join(Vocab.UNCERTAIN))


def findings_kept(generated_jsonl: Path, reference_jsonl: Path) -> dict[str, dict[str, int]]:
    """Per finding of :data:`KEPT_FINDINGS`: the held-out photos whose reference summary names it (``photos``), how
    many of them the model's own summary (``stage_a.jsonl`` of an end-to-end run) names too (``kept``), and the
    photos whose own summary names it where the reference does not (``unfounded``: what turns a pass ticket into a
    false fail end to end). Photos matched by ticket and image key; a photo the model did not summarise counts as
    missed."""
    generated = {r["ticket_key"]: r["per_image"] for r in read_jsonl(generated_jsonl)}
    counts = {name: {"kept": 0, "photos": 0, "unfounded": 0} for name in KEPT_FINDINGS}
    for ref in read_jsonl(reference_jsonl):
        own = generated.get(ref["ticket_key"], {})
        for key, summary in ref["per_image"].items():
            for name in KEPT_FINDINGS:
                named = bool(re.search(name, own.get(key) or ""))
                if re.search(name, summary):
                    counts[name]["photos"] += 1
                    counts[name]["kept"] += named
                else:
                    counts[name]["unfounded"] += named
    return counts


def findings_pattern() -> str:
    """A regular expression matching a summary that names one of :data:`FINDINGS`."""
    return "|".join(map(re.escape, FINDINGS))


# The Stage-B answers drawn more often by ``verdict_weight``: their reason names 弯曲半径不合理 (the synthetic reason of
# the cabling tickets whose fibre is unprotected or bent too tightly, ``fibre_unprotected_or_tight_bend`` in
# conf/prompts/synthetic.yaml). In run 6 Stage-B passed the three 弯曲半径不合理 test tickets from their reference
# summaries at every stage but one base: 53 of the 4,000 train tickets carry it, one character (不) away from the
# 弯曲半径合理 that 1,814 carry.
RARE_VERDICT_PATTERN = "弯曲半径不合理"
# The summaries drawn more often still by ``rare_weight``: the two findings whose loss put the most fail tickets under
# run 7's end-to-end floor (its report: the rules pass them on the model's own summaries). 弯曲半径不合理: named on
# none of the 6 held-out photos that show it in runs 1-7 (a kinked fibre against a rounded bend; 60 of 16,044 train
# photos, 0.37 %, and one character, 不, away from the 弯曲半径合理 of nearly every fibre summary). 未拧紧: kept on 10
# of 16 held-out photos, and the same 3 loose-screw tickets lost on both seeds (112 train photos, 0.70 %).
RARE_FINDING_PATTERN = "弯曲半径不合理|未拧紧"
# After run 8, 弯曲半径不合理 gets a weight of its own, a rule ahead of RARE_FINDING_PATTERN's (which then draws 未拧紧
# alone): at 16x the base named it on the 3 held-out photos that show it, on both seeds, and on 47 of the 246 others
# (seeds summed; +47 in the report's findings table; 24 of the two seeds' 34 end-to-end false fails); at 4x (run 7)
# on none.
BEND_FINDING_PATTERN = "弯曲半径不合理"


def finding_oversample(weight: float, rare: Sequence[tuple[str, float]] = ()) -> Any:
    """The ``answer_oversample`` of a summary target: ``{match: findings_pattern(), weight}``, after a rule per
    ``(pattern, weight)`` of ``rare`` (answer_oversample's list form: the first matching rule wins)."""
    findings: dict[str, Any] = {"match": findings_pattern(), "weight": float(weight)}
    if not rare:
        return findings
    return [*({"match": pattern, "weight": float(w)} for pattern, w in rare), findings]


def finding_oversampled_mix(
    path: Path,
    parent: Path,
    weight: float,
    verdict_weight: float = 1.0,
    rare: Sequence[tuple[str, float]] = (),
) -> dict[str, Any]:
    """Write a fusion file that extends ``parent`` and gives its ``bbu_summary`` target
    ``answer_oversample: {match: findings_pattern(), weight}``: the photos whose summary names a finding (17 % of
    the synthetic train photos; each finding alone 0.4-4 %) are drawn ``weight`` times as often. Each
    ``(pattern, weight)`` of ``rare`` is a rule ahead of that one (:func:`finding_oversample`). With
    ``verdict_weight`` other than 1, its ``stage_b_distill`` target draws the verdicts whose reason matches
    :data:`RARE_VERDICT_PATTERN` that many times as often too (on top of the mix's ``fail_oversample``)."""
    oversample = finding_oversample(weight, rare)
    targets: list[dict[str, Any]] = [{"name": "bbu_summary", "answer_oversample": oversample}]
    out: dict[str, Any] = {"fusion": str(path), "answer_oversample": oversample}
    if verdict_weight != 1.0:
        verdicts = {"match": RARE_VERDICT_PATTERN, "weight": float(verdict_weight)}
        targets.append({"name": "stage_b_distill", "answer_oversample": verdicts})
        out["verdict_oversample"] = verdicts
    body = {"extends": str(parent), "targets": targets}
    write_atomic(path, yaml.safe_dump(body, allow_unicode=True, sort_keys=False))
    return out


def stratified_subset(
    stage_a_jsonl: Path, per_cell: int, seed: int, out: Path, negative_share: float = 0.0
) -> dict[str, Any]:
    """``per_cell`` tickets per (mission, label), drawn with ``seed``: the Teacher's distillation input.

    ``negative_share`` of each fail cell is drawn first from tickets that carry one of the seed's negative
    items, round-robin over the items the cell has (a rare item gets as many tickets as a common one, as far
    as it has them), the rest at random: the tickets the drifted student gets wrong are the ones the
    distillation must teach, and a uniform draw holds each item only as often as the split does (弯曲半径不合理:
    53 of the 500 cabling fail tickets of the run-4 data). Returns the count per cell and per negative item.
    """
    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    items: dict[str, list[str]] = {}  # ticket_key -> its negative items, fail tickets only
    for row in read_jsonl(stage_a_jsonl):
        cells[(row["mission"], row["label"])].append(row)
        if row["label"] == "fail":
            items[row["ticket_key"]] = negative_items(list(row["per_image"].values()))
    rng = random.Random(seed)
    chosen: list[dict[str, Any]] = []
    for key in sorted(cells):
        rows = list(cells[key])
        rng.shuffle(rows)
        take = min(per_cell, len(rows))
        picked: dict[str, dict[str, Any]] = {}  # ticket_key -> row, in draw order
        if key[1] == "fail" and negative_share > 0:
            by_item: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for row in rows:
                for item in items[row["ticket_key"]]:
                    by_item[item].append(row)
            queues = [by_item[item] for item in NEGATIVE_ITEMS if by_item[item]]
            while queues and len(picked) < round(negative_share * take):
                queue = queues.pop(0)
                row = queue.pop(0)
                picked.setdefault(row["ticket_key"], row)
                if queue:
                    queues.append(queue)
        rest = [row for row in rows if row["ticket_key"] not in picked]
        chosen += [*picked.values(), *rest[: take - len(picked)]]
    write_jsonl(out, chosen)
    counts: dict[str, Any] = dict(Counter(f"{MISSIONS[r['mission']]}/{r['label']}" for r in chosen))
    drawn = Counter(item for r in chosen for item in items.get(r["ticket_key"], []))
    return counts | {"negative_items": dict(drawn)}


def collect_distill(runner_dir: Path, out: Path) -> dict[str, Any]:
    """Concatenate every mission's ``distill_chatml.jsonl`` into ``out``; size and agreement with the labels.

    ``teacher_agreement``: share of rows whose Teacher verdict equals the human label (before the conflict
    policy); ``label_agreement``: the same for the verdict the file teaches (after it).
    """
    rows = [row for path in sorted(runner_dir.glob("*/distill_chatml.jsonl")) for row in read_jsonl(path)]
    write_jsonl(out, rows)
    n = len(rows)

    def share(field: str) -> float | None:
        return sum(r.get(field) == r.get("label") for r in rows) / n if n else None

    guidance = {path.parent.name: len(json.loads(path.read_text(encoding="utf-8"))["experiences"])
                for path in sorted(runner_dir.glob("*/guidance.json"))}  # fmt: skip
    return {
        "rows": n,
        "bytes": out.stat().st_size,
        # experiences in the Teacher's converged guidance: > 0 means the distilled prompts carry guidance text
        # that the evaluations (no guidance) do not show the student
        "guidance_experiences": guidance,
        "teacher_agreement": share("teacher_verdict"),
        "label_agreement": share("verdict"),
        "conflicts": sum(bool(r.get("conflict")) for r in rows),
        "flipped": sum(bool(r.get("flipped")) for r in rows),
        "verdicts": dict(Counter(str(r.get("verdict")) for r in rows)),
        "per_mission": dict(Counter(MISSIONS.get(r.get("mission"), "other") for r in rows)),
    }


def reference_distill(stage_b_rows: Path, inputs: Path, out: Path) -> dict[str, Any]:
    """Smoke-mode stand-in for an empty distill file: the rule-derived answers of the Teacher's input tickets,
    each marked ``fallback: true`` (the tiny random Teacher writes no valid answer; a real run never does this)."""
    wanted = {row["ticket_key"] for row in read_jsonl(inputs)}
    rows = [{**row, "verdict": row["label"], "teacher_verdict": None, "fallback": True}
            for row in read_jsonl(stage_b_rows) if row["ticket_key"] in wanted]  # fmt: skip
    write_jsonl(out, rows)
    return {"rows": len(rows), "fallback": True}


def end_to_end_floor(
    predictions: Path, generated_jsonl: Path, reference_jsonl: Path | None = None
) -> dict[str, Any]:
    """Where an end-to-end run's false passes come from: the SPEC §2 rules (the synthetic labels' own,
    ``explain_group``) applied to the model's *own* summaries of each fail ticket. ``rule_pass``: fail tickets whose
    own summaries the rules pass (Stage-A lost every finding that fails them: no Stage-B can fail them from those
    summaries, the floor of the end-to-end false-pass rate); ``unparsed``: own summaries outside the SPEC §4
    grammar; ``false_pass_*``: the model's false passes split the same way (``false_pass_rule_fail``: Stage-B's).
    With ``reference_jsonl``, ``lost``: the rules' reasons on the *reference* summaries of the ``rule_pass``
    tickets (what Stage-A lost), counted once per ticket and reason."""
    own = summaries_by_ticket(generated_jsonl)
    reference = summaries_by_ticket(reference_jsonl) if reference_jsonl is not None else {}
    lost: Counter = Counter()
    counts = Counter({k: 0 for k in ("fail", "rule_pass", "unparsed", "false_pass", "false_pass_rule_pass",
                                      "false_pass_rule_fail", "false_pass_unparsed")})  # fmt: skip
    for row in read_jsonl(predictions):
        if row["label"] != "fail" or row["ticket_key"] not in own:
            continue
        ticket = own[row["ticket_key"]]
        try:
            kind = "rule_fail" if explain_group(ticket["mission"], ticket["summaries"]) else "rule_pass"
        except ValueError:
            kind = "unparsed"
        counts["fail"] += 1
        if kind != "rule_fail":
            counts[kind] += 1
        if kind == "rule_pass" and row["ticket_key"] in reference:
            truth = reference[row["ticket_key"]]
            lost.update(
                sorted({r.split(":")[0] for r in explain_group(truth["mission"], truth["summaries"])})
            )
        if bool(row["valid"]) and row["verdict"] == "pass":
            counts["false_pass"] += 1
            counts[f"false_pass_{kind}"] += 1
    return dict(counts) | ({"lost": dict(sorted(lost.items()))} if reference_jsonl is not None else {})


def false_pass_by_negative_item(predictions: Path, stage_a_jsonl: Path) -> dict[str, dict[str, Any]]:
    """False passes among fail tickets with a seed negative item (``negative``) and without (``other``),
    and per item: where the false passes sit. Read from an eval run's ``predictions.jsonl``."""
    tickets = summaries_by_ticket(stage_a_jsonl)
    counts: dict[str, Counter] = defaultdict(Counter)
    for row in read_jsonl(predictions):
        if row["label"] != "fail" or row["ticket_key"] not in tickets:
            continue
        items = negative_items(tickets[row["ticket_key"]]["summaries"])
        false_pass = bool(row["valid"]) and row["verdict"] == "pass"
        for scope in [("negative" if items else "other"), *(f"item/{i}" for i in items)]:
            counts[scope]["fail"] += 1
            counts[scope]["false_pass"] += false_pass
    return {
        scope: {"false_pass_rate": c["false_pass"] / c["fail"], "n": f"{c['false_pass']}/{c['fail']}"}
        for scope, c in sorted(counts.items())
    }
