"""``+experiment=e2e`` on the tiny model: photos -> own summaries -> own verdicts, SPEC §6 under ``e2e/``.

The Stage-B half is checked against ``+experiment=eval`` run on the summaries the e2e run wrote: the same
model answering the same prompts greedily must give the same verdicts, ticket by ticket, so ``e2e/*`` are
the eval metrics of the model's own summaries and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bbuqc_lightning.train import train

ComposeAt = Callable[[list[str], Path, Path], DictConfig]
FAST = ["logger=none", "extras.print_config=false", "trainer.enable_progress_bar=false"]


def _run(compose_at: ComposeAt, overrides: list[str], root: Path, data_dir: Path) -> tuple[dict, Path]:
    cfg = compose_at([*overrides, *FAST], root, data_dir)
    try:
        metrics, _ = train(cfg)
    finally:
        HydraConfig.instance().cfg = None
    return metrics, Path(cfg.paths.output_dir)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_e2e_writes_own_summaries_and_scores_own_verdicts(
    compose_at: ComposeAt, tmp_path: Path, data_dir: Path
) -> None:
    tokens = ["module.max_new_tokens=8", "module.stage_a_max_new_tokens=8"]
    metrics, run = _run(
        compose_at,
        ["+experiment=e2e", "data.limit_groups=3", "data.batch_size=2", *tokens],
        tmp_path / "e2e",
        data_dir,
    )
    lines = _jsonl(run / "stage_a.jsonl")
    predictions = _jsonl(run / "predictions.jsonl")
    assert len(lines) == len(predictions) == metrics["e2e/groups"] == 3
    assert [p["ticket_key"] for p in predictions] == [line["ticket_key"] for line in lines]
    assert all(
        list(line["per_image"]) == [f"图片_{i}" for i in range(1, len(line["images"]) + 1)] for line in lines
    )
    for name in ("format_valid_rate", "accuracy", "invalid_rate"):
        assert 0.0 <= metrics[f"e2e/{name}"] <= 1.0
    assert not any(k.startswith("test/") for k in metrics)  # e2e metrics have their own prefix
    # the same summaries were scored against the synthetic references (Stage-A quality of this model)
    assert metrics["stage_a/scored_groups"] == 3 and "stage_a/object_f1" in metrics
    assert json.loads((run / "e2e_eval.json").read_text(encoding="utf-8"))["reference"].endswith(
        "stage_a_test.jsonl"
    )

    # Stage-B half == +experiment=eval on those summaries, ticket by ticket.
    eval_metrics, eval_run = _run(
        compose_at,
        ["+experiment=eval", f"data.test_jsonl={run / 'stage_a.jsonl'}", "module.max_new_tokens=8"],
        tmp_path / "eval",
        data_dir,
    )
    again = _jsonl(eval_run / "predictions.jsonl")
    assert [(p["ticket_key"], p["output"]) for p in again] == [
        (p["ticket_key"], p["output"]) for p in predictions
    ]
    for name in ("format_valid_rate", "accuracy"):
        assert eval_metrics[f"test/{name}"] == metrics[f"e2e/{name}"]
