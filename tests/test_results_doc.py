"""docs/RESULTS.md's run-by-run table says what the committed reports say: every figure in "Every run at a glance"
is the seed mean of its run's ``docs/results/drift_and_cure_*_run<k>.json``, so a hand edit or a rebuilt report
that moves a number fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
STAGES = ("drift", "cure_a", "cure_b", "cure_b_penalty")


def glance_rows() -> dict[int, list[str]]:
    text = (DOCS / "RESULTS.md").read_text(encoding="utf-8")
    table = text.split("### Every run at a glance", 1)[1].split("\n\n")[2]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[int(cells[0].split()[0])] = cells
    return rows


def percent(aggregate: dict, key: str) -> str | None:
    value = aggregate.get(key)
    return None if value is None else f"{100 * value['mean']:.1f}"


def figures(cell: str) -> list[str]:
    return re.findall(r"\d+\.\d", cell.replace("*", ""))


def test_the_glance_table_has_every_committed_run() -> None:
    reports = {int(m.group(1)) for p in (DOCS / "results").glob("drift_and_cure_*.json")
               if (m := re.search(r"_run(\d+)\.json$", p.name))}  # fmt: skip
    assert set(glance_rows()) == reports


@pytest.mark.parametrize("run", sorted(glance_rows()))
def test_each_glance_row_is_its_report_s_seed_means(run: int) -> None:
    (path,) = (DOCS / "results").glob(f"drift_and_cure_*_run{run}.json")
    results = json.loads(path.read_text(encoding="utf-8"))["results"]
    cells = glance_rows()[run]
    agg = {stage: results[stage]["aggregate"] for stage in ("base", *STAGES)}
    assert figures(cells[2]) == [percent(agg["drift"], "stage_b/false_pass_rate/all")]
    for cell, stage in zip(cells[3:6], STAGES[1:], strict=True):
        expected = [percent(agg[stage], f"stage_b/{m}_rate/all") for m in ("false_pass", "false_fail")]
        assert figures(cell) == ([] if None in expected else expected), (run, stage)
        seeds = agg[stage].get("stage_b/false_pass_rate/all", {}).get("n")
        assert ("(seed 0)" in cell) == (seeds == 1), (run, stage)
    e2e = [percent(agg[s], "e2e/false_pass_rate/all") for s in ("base", "cure_a", "cure_b")]
    assert figures(cells[6]) == e2e
    f1 = [f"{agg[s]['stage_a/object_f1']['mean']:.3f}" for s in ("drift", "cure_a")]
    assert re.findall(r"\d\.\d{3}", cells[7]) == f1
