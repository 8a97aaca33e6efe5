"""``bench/drift_and_cure.py`` without training: every command composes against ``conf/`` with the intended
settings (CPU and CUDA profiles), the lenient source is blind to exactly the seed's negative items, settings
are fixed by the first call, and the report turns eval folders into tables and checks. The slow test runs
the whole pipeline on the tiny model (the CPU smoke mode)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bbuqc_lightning.config import validate_config
from bbuqc_lightning.constants import SLUG_TO_MISSION
from bbuqc_lightning.fusion_sft.datamodule import FusionDataModule
from bbuqc_lightning.train import build_objects

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:  # bench scripts import their sibling package (bench/proof/), as when run
    sys.path.insert(0, str(BENCH))

import drift_and_cure as pipeline  # noqa: E402
from proof import drift_data, drift_inputs, drift_markdown, drift_plan, drift_report  # noqa: E402

ComposeAt = Callable[[list[str], Path, Path], DictConfig]


def plan_for(tmp_path: Path, *extra: str) -> tuple[dict, list]:
    s = pipeline.settings(pipeline.parse_args(["--out", str(tmp_path / "out"), *extra]))
    return s, drift_plan.build_plan(s)


def compose_train(compose_at: ComposeAt, argv: list[str], where: Path, data_dir: Path) -> DictConfig:
    overrides = (
        argv[3:] if argv[1:3] == ["-m", "bbuqc_lightning.train"] else [*argv[2:], "+experiment=distill"]
    )
    try:
        cfg = compose_at(overrides, where, data_dir)
        validate_config(cfg, environment=False)  # later steps' inputs, maybe a GPU elsewhere
        OmegaConf.to_container(cfg.module, resolve=True)
        return cfg
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.parametrize(
    ("device", "seeds"),
    # The commands of seed 1 are those of seed 0 with another seed and folder (~6 s more per device, no
    # other option): the default run composes seed 0's and the shared steps', -m slow every command.
    [("cpu", "first"), ("cuda", "first")]
    + [pytest.param(device, "all", marks=pytest.mark.slow) for device in ("cpu", "cuda")],
)
def test_every_command_composes_with_the_intended_settings(
    compose_at: ComposeAt, tmp_path: Path, data_dir: Path, device: str, seeds: str
) -> None:
    s, plan = plan_for(tmp_path, "--device", device)
    names = [step.name for step in plan]
    assert names[:5] == ["data", "s0/base", "s0/eval_base", "s0/drift_lenient", "s0/eval_drift_lenient"]
    assert names[9:11] == ["teacher", "distill"] and names[-1] == "s1/eval_cure_b_penalty"
    cfgs: dict[str, DictConfig] = {}
    for step in plan:
        if seeds == "first" and re.match(r"s\d+/", step.name) and not step.name.startswith("s0/"):
            continue
        for i, command in enumerate(step.commands):
            if "bbuqc_lightning.train" in command.argv or command.argv[1].endswith("distill.py"):
                cfgs[f"{step.name}:{i}"] = compose_train(compose_at, command.argv, tmp_path / "c", data_dir)
    runs = Path(s["out"]) / "runs" / "s0"
    base, drift = cfgs["s0/base:0"], cfgs["s0/drift_lenient:0"]
    assert base.module.finetune == "full" and base.model.random_init
    assert not base.module.freeze_vision and cfgs["teacher:0"].module.freeze_vision  # the base's tower trains
    assert base.model.architecture.vision.depth == (s["base_vision_depth"] or 2)
    assert base.data.fusion == str(Path(s["out"]) / "fusion" / "base_findings.yaml")  # findings oversampled
    teacher_ratio = cfgs["teacher:0"].data.variables.stage_b_ratio
    assert base.data.variables.stage_b_ratio == s["base_stage_b_ratio"] != s["stage_b_ratio"] == teacher_ratio
    assert drift.module.finetune == "full" and not drift.model.random_init
    assert drift.model.model_name_or_path == str(runs / "base" / "model")
    assert drift.data.fusion == str(Path(s["out"]) / "fusion" / "drift_lenient.yaml")
    cure_a = cfgs["s0/cure_a:0"]
    assert cure_a.module.finetune == "lora" and cure_a.module.lora.k == s["cure_a_k"]
    assert cure_a.model.model_name_or_path == str(runs / "drift_lenient" / "model")
    assert plan[names.index("s0/cure_a")].commands[1].argv[-2] == f"--out={runs / 'cure_a' / 'model'}"
    grpo, penalty = cfgs["s0/cure_b:0"].module.grpo, cfgs["s0/cure_b_penalty:0"].module.grpo
    assert (list(grpo.reward_weights), grpo.scale_rewards, grpo.fail_rescue) == (
        [1.0, 0.2, 0.0],
        "group",
        True,
    )
    assert (list(penalty.reward_weights), penalty.scale_rewards) == ([1.0, 0.2, 1.0], "batch")
    e2e = cfgs["s0/eval_cure_b:1"]
    assert e2e.task_name == "e2e" and e2e.model.model_name_or_path == str(runs / "cure_b" / "model")
    distill = cfgs["distill:0"]
    assert distill.stage_b_distillation.enabled and distill.stage_b_distillation.conflict_policy == "flip"
    assert distill.model.model_name_or_path == str(Path(s["out"]) / "runs" / "teacher" / "model")
    assert cfgs["teacher:0"].module.finetune == "full"
    assert (base.trainer.precision == "bf16-mixed") == (device == "cuda")


def fusion_data(compose_at: ComposeAt, fusion: str | Path, where: Path, data_dir: Path) -> FusionDataModule:
    """The fusion SFT data module of ``data.fusion=fusion``, prepared and set up for fit."""
    cfg = compose_at(["+experiment=fusion_sft", "logger=csv", f"data.fusion={fusion}"], where, data_dir)
    try:
        data = build_objects(cfg)["datamodule"]
        data.prepare_data()
        data.setup("fit")
    finally:
        HydraConfig.instance().cfg = None
    return data


def test_the_base_mix_draws_photos_that_name_a_finding_more_often(
    compose_at: ComposeAt, tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mix = drift_data.finding_oversampled_mix(
        tmp_path / "base.yaml", BENCH.parent / "conf" / "fusion" / "default.yaml", 4.0
    )
    with caplog.at_level("INFO", logger="bbuqc_lightning.fusion_sft.datamodule"):
        data = fusion_data(compose_at, mix["fusion"], tmp_path, data_dir)
    assert [p.name for p in data.pools] == ["bbu_summary", "stage_b_distill", "bbu_dense", "lang_chat"]
    summaries = [r["messages"][-1]["content"] for r in data.train_rows if r["dataset"] == "bbu_summary"]
    finding = [any(f in text for f in drift_data.FINDINGS) for text in summaries]
    assert 0 < sum(finding) < len(finding)
    assert data.pools[0].weights == tuple(4.0 if f else 1.0 for f in finding)
    assert (
        data.pools[1].weights is not None and data.pools[2].weights is None
    )  # the rest of the mix as it was
    assert f"answer_oversample {mix['answer_oversample']['match']!r} matches {sum(finding)} of" in caplog.text
    # a rarer finding above the others: its own first rule (无法识别 stands in: the tiny data set may hold no
    # 弯曲半径不合理 photo)
    rare = drift_data.finding_oversampled_mix(
        tmp_path / "rare.yaml",
        BENCH.parent / "conf" / "fusion" / "default.yaml",
        4.0,
        rare=[("无法识别", 16.0)],
    )
    assert [r["weight"] for r in rare["answer_oversample"]] == [16.0, 4.0]
    data = fusion_data(compose_at, rare["fusion"], tmp_path, data_dir)
    expected = tuple(
        16.0 if "无法识别" in text else 4.0 if f else 1.0 for text, f in zip(summaries, finding, strict=True)
    )
    assert 16.0 in expected and 4.0 in expected and data.pools[0].weights == expected


def test_the_drift_and_cure_a_draw_their_summaries_as_the_base_does(
    compose_at: ComposeAt, tmp_path: Path, data_dir: Path
) -> None:
    """From run 9 a later fusion step keeps the base's summary draw (its rules in order: 弯曲半径不合理, then
    未拧紧, then every finding); older folders keep the embedded mix's."""
    s, _ = plan_for(tmp_path, "--device", "cuda")
    s["data_dir"] = str(data_dir)
    summary, dense = drift_inputs.summary_entries(s)
    rules = summary["answer_oversample"]
    assert [(r["match"], r["weight"]) for r in rules] == [
        (drift_data.BEND_FINDING_PATTERN, s["base_bend_finding_oversample"]),
        (drift_data.RARE_FINDING_PATTERN, s["base_rare_finding_oversample"]),
        (drift_data.findings_pattern(), s["base_finding_oversample"]),
    ]
    assert "answer_oversample" not in drift_inputs.summary_entries({**s, "summary_mix_as_base": False})[0]
    added = ("base_bend_finding_oversample", "summary_mix_as_base")
    run8 = pipeline.with_older_settings({k: v for k, v in s.items() if k not in added})
    assert "answer_oversample" not in drift_inputs.summary_entries(run8)[0]
    assert [p for p, _ in drift_inputs.rare_summary_rules(run8)] == [drift_data.RARE_FINDING_PATTERN]
    # the fusion file the drift and cure A write holds the rules, and the data module draws by them
    fusion = drift_data.fusion_file(tmp_path / "cure.yaml", [summary], [dense])
    data = fusion_data(compose_at, fusion, tmp_path, data_dir)
    texts = [r["messages"][-1]["content"] for r in data.train_rows if r["dataset"] == "bbu_summary"]
    expected = tuple(
        8.0 if "弯曲半径不合理" in text else 16.0 if "未拧紧" in text
        else 4.0 if any(f in text for f in drift_data.FINDINGS) else 1.0
        for text in texts
    )  # fmt: skip
    assert 8.0 in expected and 4.0 in expected and data.pools[0].weights == expected


def test_the_base_mix_can_draw_the_rare_verdicts_more_often(
    compose_at: ComposeAt, tmp_path: Path, data_dir: Path
) -> None:
    mix = drift_data.finding_oversampled_mix(
        tmp_path / "base.yaml", BENCH.parent / "conf" / "fusion" / "default.yaml", 4.0, verdict_weight=3.0
    )
    assert mix["verdict_oversample"] == {"match": drift_data.RARE_VERDICT_PATTERN, "weight": 3.0}
    data = fusion_data(compose_at, mix["fusion"], tmp_path, data_dir)
    verdicts = [r for r in data.train_rows if r["dataset"] == "stage_b_distill"]
    rare = [drift_data.RARE_VERDICT_PATTERN in r["messages"][-1]["content"] for r in verdicts]
    assert 0 < sum(rare) < len(rare)  # the synthetic data's reason for an unprotected or tightly bent fibre
    fail = [r["label"] == "fail" for r in verdicts]
    # the mix's fail_oversample (2.0) kept, times 3 for the rare reason
    assert data.pools[1].weights == tuple(
        (2.0 if f else 1.0) * (3.0 if m else 1.0) for f, m in zip(fail, rare, strict=True)
    )


def test_teacher_base_skips_the_teacher_and_settings_are_fixed_by_the_first_call(tmp_path: Path) -> None:
    s, plan = plan_for(tmp_path, "--device", "cpu", "--teacher", "base", "--seeds", "3", "--drift", "summary")
    assert "teacher" not in [p.name for p in plan] and s["seeds"] == [3]
    assert drift_plan.teacher_folder(s) == Path(s["out"]) / "runs" / "s3" / "base" / "model"
    pipeline.save_state(s, {})
    again = pipeline.settings(pipeline.parse_args(["--device", "cpu", "--out", str(tmp_path / "out")]))
    assert again == s
    with pytest.raises(SystemExit, match="other settings"):
        pipeline.settings(pipeline.parse_args(["--device", "cpu", "--out", s["out"], "--seeds", "0"]))
    # the other drift mechanism, from the same base models, until a cure has run
    other = pipeline.settings(
        pipeline.parse_args(["--device", "cpu", "--out", s["out"], "--drift", "lenient"])
    )
    assert other["drift"] == "lenient" and "s3/drift_lenient" in [
        p.name for p in drift_plan.build_plan(other)
    ]
    pipeline.save_state(s, {"s3/cure_a": {}})
    with pytest.raises(SystemExit, match="cures of the summary drift already ran"):
        pipeline.settings(pipeline.parse_args(["--device", "cpu", "--out", s["out"], "--drift", "lenient"]))


@pytest.mark.parametrize("run", ["h100_run4", "h100_run5", "h200_run6", "h100_run7", "h100_run8"])
def test_an_older_run_folder_still_plans_the_commands_it_ran(tmp_path: Path, run: str) -> None:
    report = json.loads((BENCH.parent / "docs" / "results" / f"drift_and_cure_{run}.json").read_text())
    out = tmp_path / "out"
    saved = {**report["settings"], "out": str(out), "data_dir": str(out / "data")}
    out.mkdir()
    (out / pipeline.STATE).write_text(json.dumps({"settings": saved, "done": {}}))
    s = pipeline.settings(pipeline.parse_args(["--device", "cuda", "--out", str(out)]))
    plan = {step.name: step for step in drift_plan.build_plan(s)}
    for name in ("s0/base", "teacher", "s0/drift_lenient"):  # the report's paths say outputs/drift
        argv = plan[name].commands[0].argv
        planned = shlex.join(["python", *argv[1:]]).replace(str(out), "outputs/drift")
        assert planned == report["steps"][name]["commands"][0]["command"], name
    # and the base's summary draw it wrote (the commands do not show it)
    assert drift_inputs.base_summary_draw(s) == (report["steps"]["s0/base"].get("prepared") or {}).get(
        "answer_oversample"
    )
    # --rerun reads the folder's settings in today's keys too
    (out / pipeline.STATE).write_text(json.dumps({"settings": saved, "done": report["steps"]}))
    assert pipeline.main(["--device", "cuda", "--out", str(out), "--rerun", "s0/cure_b", "--plan"]) == 0


def test_rerun_with_new_settings_drops_the_named_steps_and_those_after_them(tmp_path: Path) -> None:
    """The run-2 protocol: the cures again, longer, from the same drifted students; a change that would also
    alter a kept step is refused, naming it."""
    s, plan = plan_for(tmp_path, "--device", "cpu", "--seeds", "0", "--teacher", "base")
    done = {step.name: {"seconds": 1.0} for step in plan}
    pipeline.save_state(s, done)
    cures = "s0/cure_a,s0/cure_b,s0/cure_b_penalty"
    base = ["--device", "cpu", "--out", s["out"]]
    with pytest.raises(SystemExit, match="other settings"):  # --set on a later call needs --rerun
        pipeline.settings(pipeline.parse_args([*base, "--set", "grpo_steps=9"]))
    args = pipeline.parse_args([*base, "--rerun", cures, "--set", "grpo_steps=9", "--set", "cure_a_steps=7"])
    new = pipeline.settings(args)
    assert (new["grpo_steps"], new["cure_a_steps"], new["base_steps"]) == (9, 7, s["base_steps"])
    with pytest.raises(SystemExit, match="changes s0/cure_b_penalty, done and not rerun"):
        pipeline.rerun(s, dict(new), ["s0/cure_a", "s0/cure_b"], done, args.set)  # the penalty arm too
    kept = pipeline.rerun(s, new, cures.split(","), done, args.set)
    assert set(done) - set(kept) == {
        f"s0/{p}cure_{c}" for p in ("", "eval_") for c in ("a", "b", "b_penalty")
    }
    assert new["reruns"] == [
        {"steps": sorted(set(done) - set(kept)), "set": ["grpo_steps=9", "cure_a_steps=7"]}
    ]
    commands = {step.name: " ".join(c.command for c in step.commands) for step in drift_plan.build_plan(new)}
    assert "trainer.max_steps=9" in commands["s0/cure_b"] and "trainer.max_steps=7" in commands["s0/cure_a"]
    with pytest.raises(SystemExit, match="unknown step"):
        pipeline.rerun(s, new, ["s0/cure_c"], done, args.set)
    # a setting that only shapes a prepared input file: the drift's summaries are drawn as the base's too
    args = pipeline.parse_args([*base, "--rerun", "s0/cure_a", "--set", "summary_mix_as_base=false"])
    new = pipeline.settings(args)
    with pytest.raises(SystemExit, match="changes s0/drift_lenient, done and not rerun"):
        pipeline.rerun(s, new, ["s0/cure_a"], done, args.set)
    kept = pipeline.rerun(s, new, ["s0/drift_lenient"], done, args.set)  # its dependants run again with it
    assert "s0/cure_a" not in kept and "s0/base" in kept


@pytest.mark.parametrize(
    ("mission", "summaries", "rules", "lenient"),
    [
        ("BBU线缆布放要求", ["螺丝、光纤插头/BBU端光纤插头,显示完整,符合要求×1", "螺丝、光纤插头/ODF端光纤插头,显示完整,符合要求×1",
                          "光纤/无保护措施,弯曲半径不合理/铠装×1"], "fail", "pass"),
        ("BBU线缆布放要求", ["螺丝、光纤插头/BBU端光纤插头,显示完整,符合要求×1", "光纤/有保护措施,弯曲半径合理/铠装×1",
                          "标签/无法识别×2"], "fail", "fail"),  # the missing ODF plug is not a negative item
        ("BBU安装方式检查（正装）", ["BBU设备/华为,显示完整×1", "螺丝、光纤插头/BBU安装螺丝,显示完整,不符合要求/生锈×2"], "fail", "pass"),
        ("BBU安装方式检查（正装）", ["BBU设备/华为,只显示部分×1", "螺丝、光纤插头/BBU安装螺丝,显示完整,不符合要求/生锈×2"], "fail", "fail"),
        ("挡风板安装检查", ["BBU设备/华为,显示完整,机柜空间充足需要安装/这个BBU设备未按要求配备挡风板×1"], "fail", "pass"),
        ("挡风板安装检查", ["BBU设备/华为,显示完整,机柜空间充足需要安装/这个BBU设备按要求配备了挡风板×1",
                        "挡风板/华为,显示完整,安装方向错误×1"], "fail", "fail"),  # 安装方向错误: not in the seed's list
        ("BBU接地线检查", ["螺丝、光纤插头/机柜处接地螺丝,显示完整,符合要求×1", "螺丝、光纤插头/地排处接地螺丝,显示完整,符合要求×1",
                       "电线/捆扎整齐×2", "标签/可以识别×1"], "pass", "pass"),
    ],
)  # fmt: skip
def test_the_lenient_source_is_blind_to_exactly_the_seed_negative_items(
    mission: str, summaries: list[str], rules: str, lenient: str
) -> None:
    from bbuqc_lightning.data.synthetic.scenes import judge_group

    assert judge_group(mission, summaries) == rules
    assert drift_data.lenient_label(mission, summaries) == lenient


def test_the_distill_input_draws_fail_tickets_round_robin_over_the_negative_items(tmp_path: Path) -> None:
    """A fail cell of 40 common-item tickets and 4 rare-item ones: a uniform draw of 10 holds ~1 rare ticket;
    the negative-item draw takes half the cell round-robin over the two items (3 rare, 2 common), the rest at
    random; pass cells are drawn as before."""
    mission = SLUG_TO_MISSION["bbu_cabling"]
    common = "光纤/有保护措施,弯曲半径合理/蛇形管×1\n螺丝、光纤插头/BBU端光纤插头,显示完整,不符合要求×1"
    rare = "光纤/有保护措施,弯曲半径不合理/蛇形管×1"
    rows = [(f"c{i}", "fail", common) for i in range(40)] + [(f"r{i}", "fail", rare) for i in range(4)]
    rows += [(f"p{i}", "pass", "标签/可以识别×1") for i in range(20)]
    src = tmp_path / "stage_a_train.jsonl"
    src.write_text("".join(json.dumps({"ticket_key": f"QC-A-20250101-{k}::{label}", "mission": mission, "label": label,
                                       "per_image": {"图片_1": text}}, ensure_ascii=False) + "\n"
                           for k, label, text in rows), encoding="utf-8")  # fmt: skip

    def draw(share: float) -> tuple[dict, list[dict]]:
        counts = drift_data.stratified_subset(src, 10, 0, tmp_path / "in.jsonl", negative_share=share)
        return counts, [
            json.loads(line) for line in (tmp_path / "in.jsonl").read_text(encoding="utf-8").splitlines()
        ]

    counts, chosen = draw(0.5)
    keys = [row["ticket_key"] for row in chosen]
    assert len(keys) == len(set(keys)) == 20  # 10 per (mission, label), no ticket twice
    assert counts["bbu_cabling/fail"] == counts["bbu_cabling/pass"] == 10
    rare_drawn = counts["negative_items"]["弯曲半径不合理"]
    assert rare_drawn >= 3 and counts["negative_items"]["不符合要求"] == 10 - rare_drawn
    uniform, _ = draw(0.0)
    assert uniform["negative_items"].get("弯曲半径不合理", 0) < 3


def _eval_folder(
    folder: Path, prefix: str, rows: list[tuple[str, str, str]], extra: dict | None = None
) -> None:
    """``rows``: (mission slug, label, verdict) -> predictions.jsonl and the matching metrics.json."""
    folder.mkdir(parents=True)
    lines = [{"ticket_key": f"QC-A-20250101-{i}::{label}", "mission": SLUG_TO_MISSION[slug], "label": label,
              "verdict": verdict, "valid": True, "truncated": False} for i, (slug, label, verdict) in enumerate(rows)]  # fmt: skip
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    fails = [r for r in rows if r[1] == "fail"]
    metrics = {f"{prefix}/false_pass_rate": sum(r[2] == "pass" for r in fails) / len(fails), **(extra or {})}
    (folder / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")


def test_report_means_spreads_checks_and_negative_item_split(tmp_path: Path) -> None:
    s, _ = plan_for(tmp_path, "--device", "cpu")
    reference = Path(s["data_dir"]) / "synthetic" / "stage_a_test.jsonl"
    reference.parent.mkdir(parents=True)
    ref_rows = [{"group_id": f"QC-A-20250101-{i}", "ticket_key": f"QC-A-20250101-{i}::fail", "mission": "BBU线缆布放要求",
                 "label": "fail", "images": ["a.jpg"], "per_image": {"图片_1": summary}}
                for i, summary in enumerate(["光纤/无保护措施,弯曲半径合理/铠装×1", "电线/分布散乱×1"])]  # fmt: skip
    reference.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ref_rows), encoding="utf-8"
    )
    verdicts = {0: ["pass", "fail", "pass"], 1: ["pass", "pass", "pass"]}  # drift: seed 0 one FP, seed 1 two
    for seed, (v0, v1, v2) in verdicts.items():
        run = Path(s["out"]) / "runs" / f"s{seed}" / "eval_drift_lenient"
        rows = [("bbu_cabling", "fail", v0), ("bbu_cabling", "fail", v1), ("bbu_cabling", "pass", v2)]
        _eval_folder(run / "stage_b", "test", rows)
        _eval_folder(run / "e2e", "e2e", rows, {"stage_a/object_f1": 0.5 + seed / 10})
        own = (
            ["光纤/有保护措施,弯曲半径不合理/铠装×1", "电线/分布散乱×1"]  # a bend the photo does not show
            if seed
            else ["光纤/无保护措施,弯曲半径合理/铠装×1"]
        )
        lines = [{**r, "per_image": {"图片_1": summary}} for r, summary in zip(ref_rows, own, strict=False)]
        (run / "e2e" / "stage_a.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines)
        )
    report = drift_report.write_report(s, {})
    agg = report["results"]["drift"]["aggregate"]
    assert agg["stage_b/false_pass_rate/all"]["mean"] == pytest.approx(0.75)
    assert agg["stage_b/false_pass_rate/all"]["std"] == pytest.approx(0.3536, abs=1e-4)
    assert agg["stage_a/object_f1"]["mean"] == pytest.approx(0.55)
    assert (
        report["checks"]["drift_false_pass_at_least_20pct"] is True and report["checks"]["cure_a/e2e"] is None
    )
    split = report["results"]["drift"]["seeds"][0]["negative_items"]["stage_b"]
    assert (
        split["negative"]["n"] == "1/1"
        and split["other"]["n"] == "0/1"
        and split["item/无保护措施"]["n"] == "1/1"
    )
    kept = report["results"]["drift"]["seeds"][0]["findings_kept"]  # seed 0 summarised one photo of two
    assert kept["无保护措施"] == {"kept": 1, "photos": 1, "unfounded": 0}
    assert kept["分布散乱"] == {"kept": 0, "photos": 1, "unfounded": 0}
    text = (Path(s["out"]) / "drift_and_cure.md").read_text(encoding="utf-8")
    assert "| drift | stage_b | 0.750 ± 0.354 |" in text and "| base | stage_b | — |" in text
    row = next(
        line for line in text.splitlines() if line.startswith("| drift | 0/0 |")
    )  # 不符合要求: no photo
    names = next(line for line in text.splitlines() if line.startswith("| stage | 不符合要求 |")).split(" | ")
    cells = dict(zip(names, row.split(" | "), strict=True))
    assert (
        cells["无保护措施"] == "1/2" and cells["分布散乱"] == "1/2"
    )  # seeds summed: kept by seed 0, then by 1
    assert cells["弯曲半径不合理"] == "0/0 +1"  # seed 1 named a bend no photo shows


def test_the_report_gives_each_step_kind_s_measured_gpu_memory_beside_the_table(tmp_path: Path) -> None:
    s, _ = plan_for(tmp_path, "--device", "cuda")
    steps = {
        "s0/base": {"commands": [{"gpu_reserved_gb": 30.52}]},
        "s1/base": {"commands": [{"gpu_reserved_gb": 31.2}]},
        "s0/eval_base": {"commands": [{"gpu_reserved_gb": 3.1}, {"gpu_reserved_gb": 5.04}]},  # max of the two
        "data": {"commands": [{"gpu_reserved_gb": None}]},
    }
    (line,) = [x for x in drift_markdown._memory_lines({"settings": s, "steps": steps}) if x]
    assert line.endswith("base 30.5-31.2 [48.5], eval 5.0 [8.0]")
    assert drift_markdown._memory_lines({"settings": s, "steps": {"data": steps["data"]}}) == []


@pytest.mark.slow
def test_cpu_smoke_runs_every_step_on_the_tiny_model(tmp_path: Path) -> None:
    """The whole pipeline, one seed, Teacher = the base model: every entry point runs and feeds the next."""
    out = tmp_path / "smoke"
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent), "WANDB_MODE": "offline"}
    argv = [sys.executable, str(BENCH / "drift_and_cure.py"), "--device", "cpu", "--out", str(out), "--seeds", "0",
            "--teacher", "base"]  # fmt: skip
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "drift_and_cure.json").read_text(encoding="utf-8"))
    for stage in drift_plan.STAGES:
        measured = report["results"][stage]["seeds"]["0"]
        assert measured is not None and "object_f1" in measured["stage_a"], stage
        kept = measured["findings_kept"]  # from the e2e run's own summaries
        assert sum(c["photos"] for c in kept.values()) > 0 and all(
            c["kept"] <= c["photos"] for c in kept.values()
        )
        floor = measured["e2e_floor"]  # the rules on the own summaries: every fail ticket counted once
        assert floor["fail"] > 0 and floor["rule_pass"] + floor["unparsed"] <= floor["fail"]
        assert floor["false_pass"] == sum(
            floor[f"false_pass_{k}"] for k in ("rule_pass", "rule_fail", "unparsed")
        )
    assert (out / "distill" / "distill_chatml.jsonl").is_file()
    assert (out / "fusion" / "base_findings.yaml").is_file()  # the base drew the photos with findings 4x
    assert "steps left: none" in result.stdout


def test_module_is_loaded_from_the_bench_folder() -> None:
    assert isinstance(pipeline, ModuleType) and Path(pipeline.__file__).parent == BENCH


def test_the_lenient_pass_answer_is_the_synthetic_data_pass_answer() -> None:
    """The drift step's pass answer comes from the phrases the fusion sources use (a moved config broke it)."""
    answer = drift_data.pass_answer(BENCH.parent)
    assert answer.startswith("通过\n") and answer.endswith("。")


def test_a_seed_mean_exactly_on_a_bound_meets_it_despite_float32_rates() -> None:
    """10 false fails of 100 on one seed and 0 on the other: metrics.json's float32 0.1 makes the mean 0.0500000007."""
    import numpy as np

    def mean(*rates: float) -> dict[str, float]:
        return {"mean": sum(float(np.float32(r)) for r in rates) / len(rates)}

    aggregate = {"stage_b/false_pass_rate/all": mean(0.07, 0.0), "stage_b/false_fail_rate/all": mean(0.0, 0.1),
                 "stage_b/format_valid_rate/all": mean(1.0, 1.0)}  # fmt: skip
    checks = drift_report.checks({"cure_b": {"aggregate": aggregate}})
    assert checks["cure_b/stage_b"] is True
    aggregate["stage_b/false_fail_rate/all"] = mean(0.0, 0.11)
    assert drift_report.checks({"cure_b": {"aggregate": aggregate}})["cure_b/stage_b"] is False


def test_stage_a_kept_is_judged_on_the_seeds_both_stages_measured() -> None:
    """Run 7 ran cure B on seed 0 only: its F1 0.812 against the 2-seed drift mean 0.825 read as 1.3 points lost;
    against seed 0's drifted student (0.819) it is 0.7."""

    def stage(*f1: float | None) -> dict:
        seeds = {k: (None if v is None else {"stage_a": {"object_f1": v}}) for k, v in enumerate(f1)}
        values = [v for v in f1 if v is not None]
        return {"seeds": seeds, "aggregate": {"stage_a/object_f1": {"mean": sum(values) / len(values)}}}

    results = {"drift": stage(0.819, 0.831), "cure_b": stage(0.812, None), "cure_a": stage(0.824, 0.800)}
    checks = drift_report.checks(results)
    assert checks["cure_b/stage_a_f1_kept"] is True
    assert checks["cure_a/stage_a_f1_kept"] is False  # 0.812 against 0.825 on both seeds
    assert checks["cure_b_penalty/stage_a_f1_kept"] is None


def test_the_report_puts_stage_b_and_end_to_end_false_passes_per_negative_item_side_by_side() -> None:
    report = json.loads((BENCH.parent / "docs" / "results" / "drift_and_cure_h100_run7.json").read_text())
    text = drift_markdown.markdown(report)
    assert "| stage | seed | item/不符合要求 | item/弯曲半径不合理 |" in text
    # cure A seed 1: Stage-B fails all 21 不符合要求 tickets, its own summaries pass 3; 弯曲半径不合理 1 and 3 of 3
    assert "| cure_a | 1 | 0 · 3 of 21 | 1 · 3 of 3 |" in text
    assert "| cure_b | 1 |" not in text  # not run: no row


def test_the_end_to_end_floor_applies_the_rules_to_the_model_own_summaries(tmp_path: Path) -> None:
    """Three fail tickets the model passed: its own summaries keep the finding (Stage-B's false pass), lose it
    (the rules pass them too: Stage-A's), or break the grammar; a fourth it failed."""
    import random

    from bbuqc_lightning.data.synthetic.scenes import explain_group, generate_group

    mission, rng = "BBU线缆布放要求", random.Random(0)
    fail = [generate_group(mission, "fail", rng).summaries() for _ in range(4)]
    clean = generate_group(mission, "pass", rng).summaries()
    own = [fail[0], clean, ["not a summary"], fail[3]]
    generated = [{"ticket_key": f"t{i}::fail", "mission": mission, "label": "fail",
                  "per_image": {f"图片_{k + 1}": s for k, s in enumerate(summaries)}}
                 for i, summaries in enumerate(own)]  # fmt: skip
    predictions = [{"ticket_key": f"t{i}::fail", "label": "fail", "valid": True, "verdict": v}
                   for i, v in enumerate(["pass", "pass", "pass", "fail"])]  # fmt: skip
    drift_data.write_jsonl(tmp_path / "stage_a.jsonl", generated)
    drift_data.write_jsonl(tmp_path / "predictions.jsonl", predictions)
    floor = drift_data.end_to_end_floor(tmp_path / "predictions.jsonl", tmp_path / "stage_a.jsonl")
    assert floor == {"fail": 4, "rule_pass": 1, "unparsed": 1, "false_pass": 3, "false_pass_rule_pass": 1,
                     "false_pass_rule_fail": 1, "false_pass_unparsed": 1}  # fmt: skip
    # with the references: what the lost ticket (t1) fails for, by the rules on its reference summaries
    reference = [
        {**row, "per_image": {f"图片_{k + 1}": s for k, s in enumerate(fail[i])}}
        for i, row in enumerate(generated)
    ]
    drift_data.write_jsonl(tmp_path / "reference.jsonl", reference)
    floor = drift_data.end_to_end_floor(
        tmp_path / "predictions.jsonl", tmp_path / "stage_a.jsonl", tmp_path / "reference.jsonl"
    )
    reasons = {r.split(":")[0] for r in explain_group(mission, fail[1])}
    assert floor["lost"] == dict.fromkeys(sorted(reasons), 1) and reasons
