"""Teacher distillation in one command: the training-free runner with the text Teacher, then chatml SFT data.

Composes ``+experiment=distill`` with your Hydra overrides, runs :func:`bbuqc_lightning.train.train`
(reflection rounds until the guidance converges, then a final rollout at ``distill_temperature``), and
prints where each mission's ``distill_chatml.jsonl`` is with its statistics::

    python tools/distill.py                                  # embedded defaults: the fitted tiny Teacher, synthetic data
    python tools/distill.py model=qwen3_32b model.model_name_or_path=/models/Qwen3-32B \\
        data.train_jsonl=/data/qc/stage_a.jsonl module.runner.output_dir=/data/qc/distill
    python tools/distill.py model=qwen3_32b model.model_name_or_path=/models/Qwen3-32B \\
        generation.enable_thinking=true module.runner.max_new_tokens=2048 \\
        stage_b_distillation.conflict_policy=drop stage_b_distillation.distill_size=200

Qwen3-32B in bf16 needs about 65 GB for its weights plus the KV cache of K rollouts: one 80 GB GPU
(H100) holds it for short answers; ``model=qwen3_32b`` sets ``device_map: auto``, which spreads it over
every visible GPU (``CUDA_VISIBLE_DEVICES=0,1``) when one is not enough. Any override of
``python -m bbuqc_lightning.train`` works here (``logger=none``, ``hydra.run.dir=...``, ``-m`` sweeps).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from bbuqc_lightning.cli import check_composition
from bbuqc_lightning.config import config_dir, register_resolvers
from bbuqc_lightning.data.jsonl import read_jsonl
from bbuqc_lightning.train import train_or_exit

EXPERIMENT = "+experiment=distill"


def file_stats(path: Path) -> dict[str, Any]:
    """Counts of a written distillation file (read back, so the report describes what is on disk)."""
    rows = read_jsonl(path)
    verdicts = Counter(str(r.get("verdict")) for r in rows)
    labels = Counter(str(r.get("label")) for r in rows)
    return {
        "rows": len(rows),
        "verdict_pass": verdicts["pass"],
        "verdict_fail": verdicts["fail"],
        "label_pass": labels["pass"],
        "label_fail": labels["fail"],
        "conflicts": sum(bool(r.get("conflict")) for r in rows),
        "flipped": sum(bool(r.get("flipped")) for r in rows),
        "weight_sum": round(sum(float(r.get("weight", 1.0)) for r in rows), 3),
    }


def report(objects: dict[str, Any], metrics: dict[str, float], output_dir: str) -> str:
    """The lines printed at the end: one per mission file, then the run summary."""
    from bbuqc_lightning.callbacks.distillation import DistillationCallback

    callback = next((c for c in objects["callbacks"] if isinstance(c, DistillationCallback)), None)
    if callback is None or not callback.written:
        return "no distillation file was written (see the log: the run may have stopped before its final rollout)"
    lines = ["distillation files (chatml, one conversation per line):"]
    for mission, path in callback.written.items():
        stats = file_stats(path)
        lines.append(
            f"  {mission}: {path.resolve()}\n      " + " ".join(f"{k}={v}" for k, v in stats.items())
        )
        if not stats["rows"]:
            queue = path.parent / "manual_review_queue.jsonl"
            lines.append(
                f"      nothing to distill (see distill/invalid_skipped, distill/dropped); invalid: {queue.resolve()}"
            )
    summary = {k: v for k, v in metrics.items() if k.startswith(("distill/", "runner/", "final/accuracy"))}
    lines.append(
        "run summary: " + ", ".join(f"{k}={v:g}" for k, v in sorted(summary.items()) if "/rows/" not in k)
    )
    lines.append(f"run folder: {Path(output_dir).resolve()}")
    return "\n".join(lines)


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def run(cfg: DictConfig) -> None:
    metrics, objects = train_or_exit(cfg)
    print(report(objects, metrics, cfg.paths.output_dir))


def main() -> None:
    if not any(arg.startswith(("+experiment=", "experiment=")) for arg in sys.argv[1:]):
        sys.argv.append(EXPERIMENT)
    check_composition(sys.argv[1:])
    run()


if __name__ == "__main__":
    main()
