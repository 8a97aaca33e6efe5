"""``bench/learning_proof.py`` without training: every command it runs composes against ``conf/`` (CPU and
CUDA settings), bad arguments are one clear error, and the report turns an eval run's files into the tables.
The pipeline itself is run by the script (``python bench/learning_proof.py --device cpu ...``)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bbuqc_lightning.config import validate_config
from bbuqc_lightning.constants import SLUG_TO_MISSION

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPT = BENCH / "learning_proof.py"
TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_synthetic.py"
ComposeAt = Callable[[list[str], Path, Path], DictConfig]


def load(path: Path, name: str) -> ModuleType:
    if str(BENCH) not in sys.path:  # bench scripts import their sibling modules (bench/proof/), as when run
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def proof() -> ModuleType:
    return load(SCRIPT, "learning_proof")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_command_composes_with_the_intended_settings(
    proof: ModuleType, compose_at: ComposeAt, tmp_path: Path, data_dir: Path, device: str
) -> None:
    args = proof.parse_args(["--device", device, "--out", str(tmp_path / "out")])
    steps = proof.build_steps(args)
    assert list(steps) == ["data", "sft", "eval_sft", "grpo", "eval_grpo"]
    tool = load(TOOL, "make_synthetic")
    data_args = tool._parser().parse_args(steps["data"].argv[2:])
    assert (data_args.train, data_args.test) == (args.train, args.test)

    cfgs: dict[str, DictConfig] = {}
    for name in ("sft", "eval_sft", "grpo", "eval_grpo"):
        argv = steps[name].argv
        assert argv[1:3] == ["-m", "bbuqc_lightning.train"]
        try:
            cfg = compose_at(argv[3:], tmp_path / name, data_dir)
            validate_config(cfg, environment=False)  # later steps' inputs, maybe a GPU elsewhere
            OmegaConf.to_container(cfg.module, resolve=True)
            cfgs[name] = cfg
        finally:
            HydraConfig.instance().cfg = None

    sft, grpo = cfgs["sft"], cfgs["grpo"]
    assert sft.module.finetune == "full" and sft.model.random_init
    assert sft.trainer.precision == ("bf16-mixed" if device == "cuda" else "32-true")
    if device == "cuda":  # time caps keep the whole script inside one 10-minute GPU session
        assert (sft.trainer.max_time, grpo.trainer.max_time) == ("00:00:03:30", "00:00:02:30")
    else:
        assert "max_time" not in sft.trainer and "max_time" not in grpo.trainer
    assert sft.callbacks.model_folder.dirpath.endswith("model") and sft.callbacks.model_checkpoint is None
    folder = str(tmp_path / "out" / "runs" / "sft" / "model")
    for name in ("eval_sft", "grpo", "eval_grpo"):
        assert not cfgs[name].model.random_init and cfgs[name].model.model_name_or_path == folder
    assert grpo.module.lora.k == proof.num_layers(args.model)
    assert list(grpo.module.grpo.reward_weights) == [1.0, 0.2, 0.0]  # the false-pass penalty is off
    assert grpo.module.grpo.scale_rewards == "group"
    assert cfgs["eval_grpo"].module.adapter_path == str(tmp_path / "out" / "runs" / "grpo" / "adapter")
    assert cfgs["eval_sft"].module.adapter_path is None

    # The learning-rate schedule builds and lasts exactly the SFT steps.
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=sft.module.optimizer.lr)
    scheduler = instantiate(sft.module.scheduler)(optimizer=optimizer)
    lrs = []
    for _ in range(args.sft_steps):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(args.sft_lr) and lrs[-1] < args.sft_lr / 1000


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--grpo-generations", "1"], "--grpo-generations must be >= 2"),
        (["--model", "qwen3_vl_4b"], "not a random-init preset"),
        (["--model", "nope"], "no conf/model/nope.yaml"),
        (["--sft-steps", "3", "--test", "0"], "--test must be positive; --sft-steps must be >= 4"),
        (["--false-pass-penalty", "0.5"], "next to no effect with --scale-rewards group"),
    ],
)
def test_bad_arguments_are_one_clear_error(
    proof: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        proof.parse_args(["--device", "cpu", "--out", str(tmp_path / "out"), *extra])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_group_scaling_cancels_the_false_pass_penalty() -> None:
    """Why the script refuses ``--false-pass-penalty`` with group scaling: within a fail ticket's group the
    penalty only stretches the gap between right and wrong verdicts, and standardising undoes it."""
    from bbuqc_lightning.grpo.advantages import combine_rewards, compute_advantages
    from bbuqc_lightning.stage_b.rewards import false_pass_penalty, format_reward, label_reward

    answers = ["通过\n理由: 齐全。", "不通过\n理由: 缺螺丝。", "不通过\n理由: 生锈。", "通过\n理由: 好。"]
    labels = ["fail"] * 4 + ["pass"] * 4  # two tickets, G = 4 each
    completions = answers + answers
    columns = {"completions": completions, "group_label": labels}
    per_func = torch.tensor(
        [f(**columns) for f in (label_reward, format_reward, false_pass_penalty)], dtype=torch.float32
    ).T

    def advantages(penalty: float, scale: str) -> torch.Tensor:
        return compute_advantages(combine_rewards(per_func, [1.0, 0.2, penalty]), 4, scale)[0]

    # equal up to the 1e-4 added to the std
    torch.testing.assert_close(advantages(0.5, "group"), advantages(0.0, "group"), atol=1e-3, rtol=1e-3)
    for scale in ("batch", "none"):
        with_penalty, without = advantages(0.5, scale), advantages(0.0, scale)
        assert with_penalty[:4].abs().sum() > without[:4].abs().sum()  # the fail ticket pulls harder


def test_a_used_output_folder_is_refused(
    proof: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "learning_proof.json").write_text("{}", encoding="utf-8")
    with pytest.raises(SystemExit):
        proof.parse_args(["--device", "cpu", "--out", str(tmp_path / "out")])
    assert "exists and is not empty" in capsys.readouterr().err


def test_reuse_sft_runs_only_grpo_from_the_earlier_data_and_model(
    proof: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    earlier = tmp_path / "earlier"
    with pytest.raises(SystemExit):
        proof.parse_args(["--device", "cpu", "--out", str(tmp_path / "a"), "--reuse-sft", str(earlier)])
    assert "no learning_proof.json there" in capsys.readouterr().err
    (earlier / "runs" / "sft" / "model").mkdir(parents=True)
    (earlier / "runs" / "sft" / "model" / "config.json").write_text("{}", encoding="utf-8")
    settings = {key: 7 for key in proof.SFT_SETTINGS} | {"model": "tiny", "max_new_tokens": 40}
    steps = [{"name": name} for name in proof.SFT_STEPS]
    report = {"settings": settings, "steps": steps[:2], "results": {"sft": {}}}
    (earlier / "learning_proof.json").write_text(json.dumps(report), encoding="utf-8")
    with pytest.raises(SystemExit):  # no eval of the SFT model: nothing to compare GRPO with
        proof.parse_args(["--device", "cpu", "--out", str(tmp_path / "a"), "--reuse-sft", str(earlier)])
    assert "did not finish data, sft, eval_sft" in capsys.readouterr().err
    (earlier / "learning_proof.json").write_text(json.dumps({**report, "steps": steps}), encoding="utf-8")

    with pytest.raises(SystemExit):
        proof.parse_args(
            ["--device", "cpu", "--out", str(tmp_path / "b"), "--reuse-sft", str(earlier), "--test", "99"]
        )
    assert "--test comes from the reused run (7), not 99: drop it" in capsys.readouterr().err
    args = proof.parse_args(["--device", "cpu", "--out", str(tmp_path / "b"), "--reuse-sft", str(earlier)])
    assert (args.test, args.max_new_tokens, args.model) == (7, 40, "tiny")  # the earlier run's settings
    built = proof.build_steps(args)
    assert list(built) == ["grpo", "eval_grpo"]
    grpo = built["grpo"].argv
    assert f"model.model_name_or_path={earlier / 'runs' / 'sft' / 'model'}" in grpo
    assert f"paths.data_dir={earlier / 'data'}" in grpo
    assert f"hydra.run.dir={tmp_path / 'b' / 'runs' / 'grpo'}" in grpo
    assert "module.max_new_tokens=40" in built["eval_grpo"].argv


def write_eval_run(folder: Path, rows: list[tuple[str, str, str | None, bool]], metrics: dict) -> Path:
    """An eval run folder: ``rows`` of (mission slug, label, verdict, valid) and its ``metrics.json``."""
    folder.mkdir(parents=True)
    lines = [
        {
            "mission": SLUG_TO_MISSION[slug],
            "label": label,
            "verdict": verdict,
            "valid": valid,
            "truncated": False,
        }
        for slug, label, verdict, valid in rows
    ]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    (folder / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return folder


def test_report_counts_rates_and_the_claim(proof: ModuleType, tmp_path: Path) -> None:
    rows = [
        ("bbu_grounding", "fail", "pass", True),  # false pass
        ("bbu_grounding", "fail", None, False),  # invalid: in neither rate
        ("bbu_grounding", "pass", "pass", True),
        ("bbu_cabling", "pass", "fail", True),  # false fail
    ]
    metrics = {
        "test/format_valid_rate": 0.75,
        "test/accuracy": 0.25,
        "test/false_pass_rate": 0.5,
        "test/false_fail_rate": 0.5,
        "test/false_pass_rate/bbu_grounding": 0.5,
    }
    sft = proof.eval_results(write_eval_run(tmp_path / "sft", rows, metrics))
    assert sft["all"]["false_pass_rate"] == 0.5 and sft["all"]["false_pass_rate_n"] == "1/2"
    assert sft["all"]["format_valid_rate_n"] == "3/4" and sft["bbu_grounding"]["counts"]["groups"] == 3
    assert sft["baffle_installation"]["accuracy"] is None  # no tickets: no rate, never a made-up 0
    better = [(m, label, label if valid else None, valid) for m, label, _, valid in rows]
    grpo = proof.eval_results(
        write_eval_run(
            tmp_path / "grpo",
            better,
            {"test/false_pass_rate": 0.0, "test/false_fail_rate": 0.0, "test/accuracy": 0.75},
        )
    )
    claim = proof.claim_check({"sft": sft, "grpo": grpo})
    assert claim["false_pass_lowered"] and claim["false_fail_at_most_5pct"] and claim["holds"]
    assert claim["caveat"] is None  # as many valid answers as before
    worse = proof.claim_check({"sft": grpo, "grpo": sft})
    assert not worse["holds"] and worse["caveat"] is None
    sft_all_valid = {"all": {**sft["all"], "format_valid_rate": 1.0}}
    assert "fell from 1.000 to 0.750" in proof.claim_check({"sft": sft_all_valid, "grpo": sft})["caveat"]
    report = {
        "settings": {"device": "cpu", "model": "tiny", "sft_steps": 300, "grpo_steps": 10},
        "started": "now",
        "total_seconds": 1.0,
        "steps": [
            {"name": "sft", "command": "python -m x", "run_dir": "r", "wandb_runs": [], "seconds": 1.0}
        ],
        "results": {"sft": sft, "grpo": grpo},
        "claim": claim,
        "training": {"sft": {"train/loss": {"first": 9.0, "last": 1.0, "n": 120}}},
    }
    table = proof.markdown(report)
    assert "**SFT trained 120 of 300 steps** (stopped by its time cap)" in table
    assert "| all | SFT | 0.750 (3/4) | 0.250 (1/4) | 0.500 (1/2) | 0.500 (1/2) |" in table
    assert "**holds**" in table

    with pytest.raises(RuntimeError, match=r"disagrees with predictions\.jsonl"):
        proof.eval_results(write_eval_run(tmp_path / "bad", rows, {**metrics, "test/accuracy": 0.5}))
