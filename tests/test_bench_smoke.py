"""Every GPU benchmark script runs in its CPU smoke mode (tiny model), so the scripts cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run(args: list[str], tmp_path: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, *args], cwd=BENCH, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_stage_a_mixed(tmp_path: Path) -> None:
    out = tmp_path / "stage_a.json"
    run(["stage_a.py", "--mixed", "--preset", "tiny", "--device", "cpu", "--images", "4", "--baseline-images", "2",
         "--new-tokens", "4", "--call-size", "4", "--baseline-batches", "2", "--out", str(out)], tmp_path)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["engine"]["images"] == 4 and result["engine"]["captures"] >= 1
    assert result["summary"]["hf_best_images_per_s"] > 0


def test_grpo_mixed(tmp_path: Path) -> None:
    out = tmp_path / "grpo.json"
    run(["grpo.py", "--impl", "ours", "--mixed", "--max-photos", "2", "--preset", "tiny", "--device", "cpu",
         "--steps", "2", "--prompts", "2", "--new-tokens", "4", "--out", str(out)], tmp_path)  # fmt: skip
    result = json.loads(out.read_text())
    assert len(result["step_seconds"]) == 2 and result["completions_per_s_all_steps"] > 0


def test_mixed_tree(tmp_path: Path) -> None:
    run(["mixed_tree.py", "--out", str(tmp_path / "tree"), "--photos", "6"], tmp_path)
    assert len(list((tmp_path / "tree").rglob("*.jpg"))) == 6


@pytest.mark.slow
def test_profile_decode(tmp_path: Path) -> None:
    assert "replay" in run(
        [
            "profile_decode.py",
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--iters",
            "1",
            "--prompt-tokens",
            "300",
        ],
        tmp_path,
    )


def test_attention_kernels(tmp_path: Path) -> None:
    out = tmp_path / "attention.json"
    run(["attention_kernels.py", "--device", "cpu", "--smoke", "--out", str(out)], tmp_path)
    row = json.loads(out.read_text())["scenarios"]["smoke"]
    assert row["pool_vs_fp32_reference"] < 1e-4
    assert row["flex"]["max_abs_diff_vs_pool"] < 1e-4  # the block masks encode the pool layout
    assert "skipped" in row["flashinfer"] and "skipped" in row["flash_attn"]


@pytest.mark.slow
def test_grpo_compile_layers(tmp_path: Path) -> None:
    out = tmp_path / "grpo.json"
    run(["grpo.py", "--impl", "ours", "--mixed", "--max-photos", "2", "--preset", "tiny", "--device", "cpu",
         "--steps", "2", "--prompts", "2", "--new-tokens", "4", "--compile-layers", "--out", str(out)], tmp_path)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["compile_layers"] and 1 <= result["compiles"] <= 4  # plain and LoRA layers, two halves each
