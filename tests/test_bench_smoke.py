"""Every GPU benchmark script runs in its CPU smoke mode (tiny model), so the scripts cannot rot.

The default run executes each script as ``__main__`` in this process (``runpy``, with ``bench/`` first on
``sys.path`` and as the working directory, as ``python <script>`` would have them): the same code, without
a fresh interpreter's ~8 s of imports per script. ``test_script_runs_as_its_own_process`` (slow) runs them
exactly as a user would, one ``python`` process each.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
Run = Callable[[list[str]], str]


def run_as_process(args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, *args], cwd=BENCH, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Run:
    """``run(args) -> stdout``: ``python <args>`` from ``bench/``, in this process."""

    def in_process(args: list[str]) -> str:
        script = BENCH / args[0]
        monkeypatch.syspath_prepend(str(BENCH))
        monkeypatch.chdir(BENCH)
        monkeypatch.setattr(sys, "argv", [str(script), *args[1:]])
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exit_:
            assert exit_.code in (0, None), capsys.readouterr().err[-3000:]
        return capsys.readouterr().out

    return in_process


def stage_a_mixed(out: Path) -> list[str]:
    return ["stage_a.py", "--mixed", "--preset", "tiny", "--device", "cpu", "--images", "4", "--baseline-images", "2",
            "--new-tokens", "4", "--call-size", "4", "--baseline-batches", "2", "--encode-workers", "1",
            "--load-batch", "2", "--out", str(out)]  # fmt: skip


def grpo_mixed(out: Path) -> list[str]:
    return ["grpo.py", "--impl", "ours", "--mixed", "--max-photos", "2", "--preset", "tiny", "--device", "cpu",
            "--steps", "2", "--prompts", "2", "--new-tokens", "4", "--profile-step", "2",
            "--out", str(out)]  # fmt: skip


def attention_kernels(out: Path) -> list[str]:
    return ["attention_kernels.py", "--device", "cpu", "--smoke", "--out", str(out)]


def check_stage_a(out: Path) -> None:
    result = json.loads(out.read_text())
    assert result["engine"]["images"] == 4 and result["engine"]["captures"] >= 1
    stats = result["engine"]["stats"]  # prompts encoded by the DataLoader workers, not inside generate
    assert stats["prompts"] == 4 and stats["encode_seconds"] == 0 and stats["decode_steps"] > 0
    assert result["summary"]["hf_best_images_per_s"] > 0


def check_grpo(out: Path) -> None:
    result = json.loads(out.read_text())
    assert len(result["step_seconds"]) == 2 and result["completions_per_s_all_steps"] > 0
    for step, phases in zip(result["step_seconds"], result["phase_seconds"], strict=True):
        assert {"rollout", "frozen_prefix", "reference", "optimise", "other"} <= phases.keys()
        assert sum(phases.values()) == pytest.approx(step, abs=1e-3)
    assert result["profile"]["step"] == 2 and "aten::" in result["profile"]["cpu_top"]


def check_attention(out: Path) -> None:
    row = json.loads(out.read_text())["scenarios"]["smoke"]
    assert row["pool_vs_fp32_reference"] < 1e-4
    assert row["flex"]["max_abs_diff_vs_pool"] < 1e-4  # the block masks encode the pool layout
    assert "skipped" in row["flashinfer"] and "skipped" in row["flash_attn"]


def test_stage_a_mixed(run: Run, tmp_path: Path) -> None:
    run(stage_a_mixed(tmp_path / "stage_a.json"))
    check_stage_a(tmp_path / "stage_a.json")


def test_stage_a_mixed_chunked_prefill(run: Run, tmp_path: Path) -> None:
    run([*stage_a_mixed(tmp_path / "chunked.json"), "--prefill-chunk-tokens", "16"])
    check_stage_a(tmp_path / "chunked.json")
    stats = json.loads((tmp_path / "chunked.json").read_text())["engine"]["stats"]
    assert stats["mixed_steps"] >= stats["prompt_tokens"] / 16


def test_decode_beside(run: Run, tmp_path: Path) -> None:
    """The decode step timed alone, beside matrix products and beside a launching thread (CPU: no streams, so the
    priority conditions are skipped and the products run in a thread)."""
    out = tmp_path / "beside.json"
    run(["decode_beside.py", "--preset", "tiny", "--device", "cpu", "--iters", "2", "--rows", "8",
         "--prompt-bucket", "256", "--gemm-tokens", "256", "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert set(result["step_ms"]) == {"alone", "gemm", "gil", "gil_switch"} and all(
        v > 0 for v in result["step_ms"].values()
    )
    assert result["loads"]["gemm"]["load_covered"] and result["priority"].startswith("skipped")


def test_stage_a_mixed_overlapped_prefill(run: Run, tmp_path: Path) -> None:
    run([*stage_a_mixed(tmp_path / "overlapped.json"), "--overlap-prefill", "--baseline-images", "0",
         "--overlap-switch-interval", "0.0005"])  # fmt: skip
    result = json.loads((tmp_path / "overlapped.json").read_text())
    assert result["config"]["overlap_switch_interval"] == 0.0005
    assert result["config"]["overlap_prefill"] and "overlapped_prefills" in result["engine"]["stats"]
    assert result["engine"]["stats"]["prompts"] == 4
    assert result["hf"] == {} and result["summary"]["ratio"] is None  # --baseline-images 0: no HF baseline


def test_grpo_mixed(run: Run, tmp_path: Path) -> None:
    run(grpo_mixed(tmp_path / "grpo.json"))
    check_grpo(tmp_path / "grpo.json")


def test_mixed_tree(run: Run, tmp_path: Path) -> None:
    assert "6 photos under" in run(["mixed_tree.py", "--out", str(tmp_path / "tree"), "--photos", "6"])
    assert len(list((tmp_path / "tree").rglob("*.jpg"))) == 6


def test_sdpa_shapes(run: Run, tmp_path: Path) -> None:
    """Both arms run every length twice (the script turns cuDNN attention off for its second arm; restored here)."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        run(["sdpa_shapes.py", "--preset", "tiny", "--device", "cpu", "--lengths", "16", "24", "--rows", "2",
             "--out", str(tmp_path / "sdpa.json")])  # fmt: skip
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
    arms = json.loads((tmp_path / "sdpa.json").read_text())["arms"]
    assert list(arms["cudnn_first"]["lengths"]) == ["16", "24"] and list(arms["no_cudnn"]["lengths"]) == [
        "24",
        "32",
    ]
    assert all(r["second_s"] > 0 for a in arms.values() for r in a["lengths"].values())


def test_attention_kernels(run: Run, tmp_path: Path) -> None:
    run(attention_kernels(tmp_path / "attention.json"))
    check_attention(tmp_path / "attention.json")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["stage_a", "grpo", "mixed_tree", "attention_kernels"])
def test_script_runs_as_its_own_process(script: str, tmp_path: Path) -> None:
    out = tmp_path / f"{script}.json"
    if script == "stage_a":
        run_as_process(stage_a_mixed(out))
        check_stage_a(out)
    elif script == "grpo":
        run_as_process(grpo_mixed(out))
        check_grpo(out)
    elif script == "attention_kernels":
        run_as_process(attention_kernels(out))
        check_attention(out)
    else:
        run_as_process(["mixed_tree.py", "--out", str(tmp_path / "tree"), "--photos", "6"])
        assert len(list((tmp_path / "tree").rglob("*.jpg"))) == 6


@pytest.mark.slow
def test_profile_decode(tmp_path: Path) -> None:
    assert "replay" in run_as_process(
        ["profile_decode.py", "--preset", "tiny", "--device", "cpu", "--iters", "1", "--prompt-tokens", "300"]
    )


@pytest.mark.slow
def test_grpo_compile_layers(tmp_path: Path) -> None:
    out = tmp_path / "grpo.json"
    run_as_process(["grpo.py", "--impl", "ours", "--mixed", "--max-photos", "2", "--preset", "tiny", "--device", "cpu",
                    "--steps", "2", "--prompts", "2", "--new-tokens", "4", "--compile-layers", "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["compile_layers"] and 1 <= result["compiles"] <= 4  # plain and LoRA layers, two halves each


def test_profile_prefill(run: Run, tmp_path: Path) -> None:
    out = tmp_path / "prefill.json"
    run(["profile_prefill.py", "--preset", "tiny", "--device", "cpu", "--photos", "4", "--chunks", "2", "4",
         "--iters", "1", "--out", str(out)])  # fmt: skip
    chunks = json.loads(out.read_text())["chunks"]
    assert set(chunks) == {"2", "4"}
    assert all(0 < row["vision_s"] < row["prefill_s"] and row["tokens_per_s"] > 0 for row in chunks.values())


@pytest.mark.slow
def test_fusion_sft_group_by_length(tmp_path: Path) -> None:
    """Both arms run the drift base's command (tiny model), draw the same rows, and grouping cuts the padding."""
    out = tmp_path / "fusion_sft"
    table = run_as_process(
        ["fusion_sft.py", "--device", "cpu", "--out", str(out), "--steps", "3", "--warmup", "1"]
    )
    report = json.loads((out / "fusion_sft.json").read_text())
    shuffled, grouped = report["arms"]["shuffled"], report["arms"]["grouped"]
    assert shuffled["steps"] == grouped["steps"] == 3 and shuffled["timed_steps"] == 2
    assert grouped["padding_share"] < shuffled["padding_share"]
    assert all(r["real_tokens_per_s"] > 0 and r["median_step_s"] > 0 for r in (shuffled, grouped))
    assert "grouped / shuffled" in table
    assert (
        "group_by_length: " in (out / "logs" / "grouped.log").read_text()
    )  # setup logged the padding both ways
    assert "group_by_length: " not in (out / "logs" / "shuffled.log").read_text()
