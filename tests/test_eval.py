"""Stage-B evaluation (``+experiment=eval``): exact rates on a hand-built set with known answers, the review
queue and malformed files, confusion matrices, adapter loading, and the experiment end to end.

A random tiny model cannot write a valid verdict, so known-answer checks feed fixed answer texts through the
same code the module runs (``EvalReport.add``), once directly (``evaluate_outputs``) and once through
``trainer.test`` with an engine that returns those texts; the real tiny model checks the plumbing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from bbuqc_lightning.config import config_dir
from bbuqc_lightning.constants import MISSIONS, SLUG_TO_MISSION, VERDICT_FAIL, VERDICT_PASS
from bbuqc_lightning.eval.module import EvalModule
from bbuqc_lightning.generation.engine import Completion, SamplingParams
from bbuqc_lightning.models.factory import ModelBundle, load_model
from bbuqc_lightning.models.lora import apply_last_k_lora
from bbuqc_lightning.stage_b.builder import build_stage_b_samples, read_stage_a_jsonl
from bbuqc_lightning.stage_b.datamodule import StageBDataModule
from bbuqc_lightning.stage_b.report import EvalReport, evaluate_outputs
from bbuqc_lightning.stage_b.report_files import MALFORMED, MANUAL_REVIEW, PREDICTIONS
from bbuqc_lightning.stage_b.sample import StageBSample
from bbuqc_lightning.train import train

GROUNDING = SLUG_TO_MISSION["bbu_grounding"]
CABLING = SLUG_TO_MISSION["bbu_cabling"]
BAFFLE = SLUG_TO_MISSION["baffle_installation"]
COPIED = "光纤/无保护措施,弯曲半径不合理×1"  # >= 12 characters: pasting it whole breaks the contract

# (mission, label, answer) per group; the comment is what the answer counts as.
CASES: list[tuple[str, str, str]] = [
    (GROUNDING, "fail", f"{VERDICT_PASS}\n理由: 图片_1接地螺丝齐全。"),  # false pass
    (GROUNDING, "fail", f"{VERDICT_FAIL}\n理由: 图片_1接地螺丝未拧紧。"),  # correct
    (GROUNDING, "pass", f"{VERDICT_PASS}\n理由: 接地线完整。"),  # correct
    (GROUNDING, "pass", VERDICT_PASS),  # invalid (one line): review, not a pass
    (CABLING, "pass", f"{VERDICT_FAIL}\n理由: 图片_1光纤弯曲半径不合理。"),  # false fail
    (CABLING, "fail", f"<think>\n\n</think>\n\n{VERDICT_FAIL}\n理由：图片_1无保护措施。"),  # correct
    (CABLING, "fail", f"{VERDICT_PASS}\n理由: {COPIED}"),  # invalid (copied summary): never a pass
    (BAFFLE, "pass", f"{VERDICT_PASS}\n理由: 挡风板安装方向正确。"),  # correct
]
INVALID = {3: "line_count", 6: "copied_summary"}  # case index -> error code

# Every rate by hand. No fail-labelled baffle group -> no false_pass_rate/baffle_installation; no
# bbu_installation group -> no bbu_installation key at all (decision 1 of stage_b/metrics.py).
EXPECTED: dict[str, float] = {
    "test/false_pass_rate": 1 / 4,
    "test/false_fail_rate": 1 / 4,
    "test/accuracy": 4 / 8,
    "test/format_valid_rate": 6 / 8,
    "test/invalid_rate": 2 / 8,
    "test/false_pass_rate/bbu_grounding": 1 / 2,
    "test/false_fail_rate/bbu_grounding": 0.0,
    "test/accuracy/bbu_grounding": 2 / 4,
    "test/format_valid_rate/bbu_grounding": 3 / 4,
    "test/invalid_rate/bbu_grounding": 1 / 4,
    "test/false_pass_rate/bbu_cabling": 0.0,
    "test/false_fail_rate/bbu_cabling": 1.0,
    "test/accuracy/bbu_cabling": 1 / 3,
    "test/format_valid_rate/bbu_cabling": 2 / 3,
    "test/invalid_rate/bbu_cabling": 1 / 3,
    "test/false_fail_rate/baffle_installation": 0.0,
    "test/accuracy/baffle_installation": 1.0,
    "test/format_valid_rate/baffle_installation": 1.0,
    "test/invalid_rate/baffle_installation": 0.0,
}
# Rows: label pass, fail; columns: verdict pass, fail, invalid.
EXPECTED_CONFUSION = {
    "bbu_grounding": [[1, 0, 1], [1, 1, 0]],
    "bbu_cabling": [[0, 1, 0], [0, 1, 1]],
    "baffle_installation": [[1, 0, 0], [0, 0, 0]],
    "all": [[2, 1, 1], [1, 2, 1]],
}


def write_known_set(path: Path) -> Path:
    """The Stage-A JSONL of :data:`CASES`; summaries differ per group (the canned engine keys on them)."""
    rows = []
    for i, (mission, label, _) in enumerate(CASES):
        gid = f"QC-TEMP-20250101-{i:07d}"
        rows.append(
            {
                "group_id": gid,
                "ticket_key": f"{gid}::{label}",
                "mission": mission,
                "label": label,
                "images": ["IMG_1.jpg", "IMG_2.jpg"],
                "per_image": {"图片_1": COPIED, "图片_2": f"标签/可以识别×{i + 1}"},
            }
        )
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def templates() -> dict[str, Any]:
    container = OmegaConf.to_container(OmegaConf.load(config_dir() / "prompts" / "stage_b.yaml"))
    assert isinstance(container, dict)
    return container


@pytest.fixture
def known_samples(tmp_path: Path) -> list[StageBSample]:
    records, _ = read_stage_a_jsonl(write_known_set(tmp_path / "known.jsonl"))
    samples, _ = build_stage_b_samples(records, templates(), None)
    return samples


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_known_files(run: Path, samples: Sequence[StageBSample]) -> None:
    """predictions / review queue / malformed / confusion files of the known set."""
    predictions = read_lines(run / PREDICTIONS)
    assert [p["ticket_key"] for p in predictions] == [s.ticket_key for s in samples]
    assert [p["output"] for p in predictions] == [answer for _, _, answer in CASES]
    assert [p["verdict"] for p in predictions] == ["pass", "fail", "pass", None, "fail", "fail", None, "pass"]
    assert [p["valid"] for p in predictions] == [i not in INVALID for i in range(len(CASES))]
    review = read_lines(run / MANUAL_REVIEW)
    assert [r["ticket_key"] for r in review] == [samples[i].ticket_key for i in INVALID]
    assert [r["reason"].split(":")[0] for r in review] == list(INVALID.values())
    assert {r["source"] for r in review} == {"eval"}
    malformed = read_lines(run / MALFORMED)
    assert [m["raw_output"] for m in malformed] == [CASES[i][2] for i in INVALID]
    confusion = json.loads((run / "confusion.json").read_text(encoding="utf-8"))
    assert {name: c["counts"] for name, c in confusion.items()} == EXPECTED_CONFUSION
    for name in EXPECTED_CONFUSION:
        with Image.open(run / "confusion" / f"{name}.png") as image:
            assert image.format == "PNG" and image.width > 300
    assert not (run / "confusion" / "bbu_installation.png").exists()


# --------------------------------------------------------------------------- known answers
def test_evaluate_outputs_gives_the_hand_computed_rates(
    tmp_path: Path, known_samples: list[StageBSample]
) -> None:
    result = evaluate_outputs(known_samples, [answer for _, _, answer in CASES], tmp_path / "run")
    assert result.metrics == pytest.approx(EXPECTED)
    assert set(result.metrics) == set(EXPECTED)
    assert result.counts == {"predictions": 8, "manual_review": 2}
    assert sorted(result.images) == sorted(EXPECTED_CONFUSION)
    assert_known_files(tmp_path / "run", known_samples)


def test_files_are_streamed_per_batch_and_restarted_per_run(
    tmp_path: Path, known_samples: list[StageBSample]
) -> None:
    answers = [answer for _, _, answer in CASES]
    report = EvalReport(tmp_path, fsync=False)
    report.add(known_samples[:4], answers[:4])
    # Before the run ends, the first batch is on disk, its invalid answer already queued for review.
    assert len(read_lines(tmp_path / PREDICTIONS)) == 4
    assert [r["ticket_key"] for r in read_lines(tmp_path / MANUAL_REVIEW)] == [known_samples[3].ticket_key]
    report.add(known_samples[4:], answers[4:])
    report.finish()
    assert len(read_lines(tmp_path / PREDICTIONS)) == 8
    # A second eval in the same folder replaces the files rather than appending to them.
    evaluate_outputs(known_samples[:2], answers[:2], tmp_path, fsync=False)
    assert len(read_lines(tmp_path / PREDICTIONS)) == 2
    assert read_lines(tmp_path / MANUAL_REVIEW) == []


class CannedEngine:
    """Stands in for the generation engine: answers each prompt with the text fixed for its group."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers  # user message -> answer
        self.calls = 0

    def generate(
        self, conversations: Sequence[Sequence[dict]], params: SamplingParams
    ) -> list[list[Completion]]:
        self.calls += 1
        return [
            [Completion(i, self.answers[c[-1]["content"]], [], False)] for i, c in enumerate(conversations)
        ]


def test_eval_module_logs_the_known_rates_through_trainer_test(
    tmp_path: Path, tiny_bundle: ModelBundle, known_samples: list[StageBSample]
) -> None:
    data = StageBDataModule(
        None,
        None,
        templates(),
        processor=tiny_bundle.processor,
        test_jsonl=str(write_known_set(tmp_path / "known.jsonl")),
        val_batch_size=3,  # three batches: the counts must accumulate across them
    )
    module = EvalModule(tiny_bundle, output_dir=str(tmp_path / "run"), fsync=False)
    answers = {
        s.messages[-1]["content"]: answer for s, (_, _, answer) in zip(known_samples, CASES, strict=True)
    }
    module.engine = CannedEngine(answers)  # type: ignore[assignment]
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.test(module, datamodule=data, verbose=False)
    assert module.engine.calls == 3
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert {k: v for k, v in logged.items() if k in EXPECTED} == pytest.approx(EXPECTED)
    assert set(logged) - set(EXPECTED) == {"test/groups", "test/manual_review", "test/groups_per_s"}
    assert logged["test/groups"] == 8 and logged["test/manual_review"] == 2
    assert_known_files(tmp_path / "run", known_samples)


# --------------------------------------------------------------------------- adapter
def test_adapter_is_loaded_and_merged(tmp_path: Path, tiny_architecture: dict[str, Any]) -> None:
    def fresh() -> ModelBundle:
        return load_model(kind="vl", random_init=True, architecture=tiny_architecture, seed=0)

    trained = apply_last_k_lora(fresh().model, k=2, r=4, alpha=8, dropout=0.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero (a no-op adapter): give it weights that matter
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    trained.save_pretrained(str(tmp_path / "adapter"))
    ids = torch.randint(0, 1000, (1, 12), generator=generator)
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        base = fresh()
        before = base.model(input_ids=ids).logits
        module = EvalModule(base, output_dir=str(tmp_path / "run"), adapter_path=str(tmp_path / "adapter"))
        merged = module.model(input_ids=ids).logits
    assert torch.allclose(merged, expected, atol=1e-4)
    assert not torch.allclose(merged, before, atol=1e-3)
    assert not any("lora_" in name for name, _ in module.model.named_parameters())
    assert module.engine.model is module.model


def test_missing_adapter_is_a_clear_error(tmp_path: Path, tiny_bundle: ModelBundle) -> None:
    with pytest.raises(FileNotFoundError, match=r"module.adapter_path=.*no adapter_config.json"):
        EvalModule(tiny_bundle, output_dir=str(tmp_path), adapter_path=str(tmp_path / "nope"))


# --------------------------------------------------------------------------- the experiment
def test_eval_experiment_end_to_end(compose: Callable[[list[str]], DictConfig], tmp_path: Path) -> None:
    """``+experiment=eval`` on the embedded defaults (tiny model, synthetic test set, W&B offline)."""
    cfg = compose(["+experiment=eval", "module.max_new_tokens=16", "extras.print_config=false"])
    metrics, objects = train(cfg)
    run = tmp_path / "run"
    test_keys = {r["ticket_key"] for r in read_lines(Path(cfg.data.test_jsonl))}
    on_disk = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert on_disk == pytest.approx(metrics)
    names = ("false_pass_rate", "false_fail_rate", "accuracy", "format_valid_rate", "invalid_rate")
    for name in names:
        assert f"test/{name}" in on_disk
        for slug in MISSIONS.values():  # the synthetic set has pass and fail groups of every mission
            assert f"test/{name}/{slug}" in on_disk
    predictions = read_lines(run / PREDICTIONS)
    assert {p["ticket_key"] for p in predictions} == test_keys
    assert on_disk["test/groups"] == len(test_keys) == len(predictions)
    assert not [k for k in on_disk if k.startswith("gpu/")]  # no GPU peak where CUDA was never used
    invalid = [p["ticket_key"] for p in predictions if not p["valid"]]
    assert [r["ticket_key"] for r in read_lines(run / MANUAL_REVIEW)] == invalid
    assert len(read_lines(run / MALFORMED)) == len(invalid) == on_disk["test/manual_review"]
    assert on_disk["test/invalid_rate"] == pytest.approx(len(invalid) / len(predictions))
    for name in [*MISSIONS.values(), "all"]:
        assert (run / "confusion" / f"{name}.png").is_file()
    media = next((run / "wandb").glob("offline-run-*/files/media"))
    table = json.loads(next(media.glob("table/test/predictions_*.table.json")).read_text(encoding="utf-8"))
    assert len(table["data"]) == len(test_keys)
    assert table["columns"][:4] == ["ticket_key", "mission", "label", "summaries"]
    assert len(list(media.glob("images/test/confusion/*.png"))) == len(MISSIONS) + 1
    assert isinstance(objects["module"], EvalModule)


@pytest.mark.gpu
def test_gpu_memory_peaks_give_what_tensors_held_and_what_the_allocator_reserved() -> None:
    """What ``train`` adds to metrics.json on a GPU (the CPU run above shows it adds nothing there)."""
    from bbuqc_lightning.constants import GPU_ALLOCATED_KEY, GPU_RESERVED_KEY
    from bbuqc_lightning.train import gpu_memory_peaks

    block = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 0.25 GiB
    peaks = gpu_memory_peaks()
    del block
    assert 0.25 <= peaks[GPU_ALLOCATED_KEY] <= peaks[GPU_RESERVED_KEY]
