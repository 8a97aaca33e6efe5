"""The training-free Stage-B runner: guidance, selection, reflection parsing, and whole runs through ``train``.

Two kinds of whole runs:
- the real tiny random Qwen3-VL (its answers are almost always invalid): the run terminates, writes every
  artifact, never applies a bad reflection, and its metrics are what the selections say;
- a scripted generator (:class:`ScriptedEngine`, same ``generate`` signature as the engine) for the control
  flow a random model cannot produce: valid verdicts and JSON reflections.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from omegaconf import DictConfig

import bbuqc_lightning.generation.engine as engine_module
from bbuqc_lightning.callbacks.distillation import DistillationCallback
from bbuqc_lightning.config import config_dir
from bbuqc_lightning.constants import MISSIONS
from bbuqc_lightning.data.jsonl import read_jsonl
from bbuqc_lightning.data.synthetic.tree import ensure_synthetic
from bbuqc_lightning.generation.engine import Completion, SamplingParams
from bbuqc_lightning.stage_b.prompts import format_summaries
from bbuqc_lightning.stage_b.sample import StageBSample
from bbuqc_lightning.stage_b_runner.artifacts import MissionArtifacts, snapshot_versions
from bbuqc_lightning.stage_b_runner.config import RunnerConfig
from bbuqc_lightning.stage_b_runner.guidance import (
    GuidanceLimits,
    MissionGuidance,
    Operation,
    apply_operations,
    read_guidance_blocks,
)
from bbuqc_lightning.stage_b_runner.reflection import parse_reflection
from bbuqc_lightning.stage_b_runner.reflection_round import mission_outcome
from bbuqc_lightning.stage_b_runner.review import review_pending
from bbuqc_lightning.stage_b_runner.selection import Candidate, GroupResult, select_candidate
from bbuqc_lightning.tracking.signals import Interrupted
from bbuqc_lightning.train import train

ComposeFn = Callable[[list[str]], DictConfig]
M1, M2 = "BBU接地线检查", "挡风板安装检查"
ARTIFACTS = (
    "guidance.json",
    "trajectories.jsonl",
    "selections.jsonl",
    "reflection.jsonl",
    "manual_review_queue.jsonl",
)
TICKET = re.compile(r"QC-[A-Z]+-[0-9]{8}-[0-9]+::(?:pass|fail)")
FAST = [
    "model=tiny_text",  # the random tiny model: these tests check the plumbing, not the fitted demo Teacher
    "module.runner.num_rollouts=2",
    "module.runner.max_new_tokens=8",
    "module.runner.reflection_max_new_tokens=8",
]


def cand(i: int, verdict: str | None, reason: str = "图片_1显示符合要求") -> Candidate:
    valid = verdict is not None
    return Candidate(i, "x", verdict, valid, None if valid else "line_count: …", reason if valid else None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ selection
def test_majority_tie_and_invalid_selection() -> None:
    s = select_candidate([cand(0, "pass"), cand(1, "pass"), cand(2, "fail"), cand(3, None)])
    assert (s.verdict, s.index, s.vote_strength, s.disagreement) == ("pass", 0, 0.5, True)
    assert s.votes == {"pass": 2, "fail": 1, "invalid": 1}
    tie = select_candidate([cand(0, "pass"), cand(1, "fail")])
    assert (tie.verdict, tie.index) == ("fail", 1)  # ties -> 不通过
    none = select_candidate([cand(0, None), cand(1, None)])
    assert (none.verdict, none.index, none.vote_strength, none.disagreement) == (None, None, 0.0, False)


def test_group_flags() -> None:
    def group(label: str | None, verdicts: list[str | None]) -> GroupResult:
        cands = [cand(i, v) for i, v in enumerate(verdicts)]
        sample = StageBSample([], group_id="K", ticket_key="K", mission=M1, label=label, summaries=["a"])
        return GroupResult(sample, [], 0, 0, cands, select_candidate(cands))

    false_pass = group("fail", ["pass", "pass"])
    assert (false_pass.label_match, false_pass.conflict_flag, false_pass.is_mistake) == (False, True, True)
    invalid = group("fail", [None, None])
    assert (invalid.label_match, invalid.conflict_flag, invalid.is_mistake) == (False, False, True)
    agreeing = group("pass", ["pass", "pass"])
    assert (agreeing.label_match, agreeing.is_mistake) == (True, False)
    assert group("pass", ["pass", None]).is_mistake  # rollouts disagree
    assert group(None, ["pass", "pass"]).label_match is None


# ------------------------------------------------------------------------------------------ guidance
def op(kind: str, exp_id: str | None = None, text: str | None = None) -> Operation:
    return Operation(kind, exp_id, text, ("K::fail",), "理由")  # type: ignore[arg-type]


def test_guidance_ids_natural_order_never_reused_and_capped() -> None:
    g = MissionGuidance.from_json(
        {"mission": M1, "experiences": [{"id": "G10", "text": "十"}, {"id": "G2", "text": "二"}]}, "mem",
        GuidanceLimits(max_experiences=3, max_chars=10),
    )  # fmt: skip
    assert list(g.as_prompt()) == ["G2", "G10"] and g.next_id == 11
    g2, changes, rejected = apply_operations(
        g, [op("delete", "G10"), op("add", text="新"), op("edit", "G2", "改")]
    )
    assert [c.id for c in changes] == ["G10", "G11", "G2"] and not rejected
    assert g2.as_prompt() == {"G2": "改", "G11": "新"} and g2.version == 1  # one version per round
    g3, _, rejected = apply_operations(
        g2,
        [op("add", text="甲"), op("add", text="乙"), op("edit", "G10", "x"), op("add", text="甲"),
         op("add", text="太长" * 10), op("add", text="两\n行"), op("edit", "G2", "改"), op("delete", "G11"),
         op("edit", "G11", "y")],
    )  # fmt: skip
    codes = [r.code for r in rejected]
    assert codes == ["size_cap", "unknown_id", "duplicate_text", "text_too_long", "bad_text", "duplicate_text",
                     "unknown_id"]  # fmt: skip
    assert g3.as_prompt() == {"G2": "改", "G12": "甲"} and g3.version == 2
    unchanged, changes, _ = apply_operations(g3, [op("edit", "G99", "z")])
    assert unchanged is g3 and not changes  # nothing applied: same version


def test_guidance_files_snapshots_retention_and_both_input_forms(tmp_path: Path) -> None:
    files = MissionArtifacts(tmp_path / "m", "run", fsync=False, snapshot_retention=2)
    g = MissionGuidance(M1)
    for i in range(4):
        files.save_guidance(g)
        g, _, _ = apply_operations(g, [op("add", text=f"规则{i}")])
    assert snapshot_versions(tmp_path / "m") == [2, 3]
    reloaded = files.load_guidance(GuidanceLimits())
    assert reloaded is not None and reloaded.version == 3 and list(reloaded.as_prompt()) == ["G0", "G1", "G2"]
    mapping = read_guidance_blocks({M1: {"experiences": ["a", "b"]}, M2: {"experiences": []}}, "f.json")
    assert mapping[M1].as_prompt() == {"G0": "a", "G1": "b"} and mapping[M2].version == 0
    with pytest.raises(ValueError, match=r"f.json \[挡风板安装检查\]: experience #0"):
        read_guidance_blocks({M2: {"experiences": [{"id": "X1", "text": "t"}]}}, "f.json")


def test_a_teacher_spread_over_gpus_uses_hf_generate() -> None:
    """``device_map="auto"`` over several GPUs: HF generate (the KV pool lives on one device)."""
    from bbuqc_lightning.generation.engine import _resolve_backend

    class Spread:
        hf_device_map: ClassVar[dict[str, int]] = {"model.layers.0": 0, "model.layers.63": 1}

    class OneGpu:
        hf_device_map: ClassVar[dict[str, int]] = {"": 0}

    assert _resolve_backend(Spread(), "auto") == "hf"
    assert _resolve_backend(OneGpu(), "auto") == "pool" and _resolve_backend(object(), "hf") == "hf"


# ------------------------------------------------------------------------------------------ reflection parsing
def test_reflection_answers_are_strict() -> None:
    ok = {"op": "add", "text": "规则", "evidence": ["K::fail"], "reason": "漏判"}
    fenced = (
        "<think>\n想一想\n</think>\n```json\n"
        + json.dumps({"operations": [ok]}, ensure_ascii=False)
        + "\n```"
    )
    assert parse_reflection(fenced, {"K::fail"}).operations[0].text == "规则"
    assert parse_reflection('{"operations": []}', set()).operations == []
    for bad, code in [("好的", "not_json"), ("[]", "bad_shape"), ('{"operations": [], "note": 1}', "bad_shape"),
                      ("<think>没完", "think_unterminated")]:  # fmt: skip
        assert parse_reflection(bad, {"K::fail"}).error.code == code  # type: ignore[union-attr]
    items = [
        {**ok, "extra": 1},
        {**ok, "evidence": ["Z::pass"]},
        {**ok, "evidence": []},
        {**ok, "reason": " "},
        {"op": "merge"},
        {"op": "delete", "id": "G0", "evidence": ["K::fail"], "reason": "r"},
        ok,
    ]
    answer = parse_reflection(json.dumps({"operations": items}), {"K::fail"}, max_operations=6)
    assert [r.code for r in answer.rejected] == [
        "bad_keys", "unknown_evidence", "bad_evidence", "bad_value", "unknown_op", "too_many_operations"
    ]  # fmt: skip
    assert [o.op for o in answer.operations] == ["delete"]


def test_review_mode_queues_then_approval_applies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = RunnerConfig(output_dir=str(tmp_path), review_mode=True, fsync=False)
    files = MissionArtifacts(tmp_path / "bbu_grounding", "run", fsync=False)
    files.save_guidance(MissionGuidance(M1))
    case = GroupResult(StageBSample([], "K", "K::fail", M1, "fail", ["a"]), [], 0, 0, [cand(0, "pass")],
                       select_candidate([cand(0, "pass")]))  # fmt: skip
    text = json.dumps({"operations": [{"op": "add", "text": "规则A", "evidence": ["K::fail"], "reason": "误放行"},
                                      {"op": "add", "text": "规则B", "evidence": ["K::fail"], "reason": "误放行"}]})  # fmt: skip
    result = mission_outcome(MissionGuidance(M1), [case], text, cfg, "run/epoch0/bbu_grounding")
    assert result.pending == 2 and not result.applied and result.guidance.version == 0
    for name, row in result.rows:
        files.append(name, row)
    files.close()
    pending = read_jsonl(files.path("pending_proposals.jsonl"))
    ids = [row["proposal_id"] for row in pending]
    assert ids == ["run/epoch0/bbu_grounding#0", "run/epoch0/bbu_grounding#1"]
    with pytest.raises(ValueError, match="no pending proposal"):
        review_pending(files.folder, approve=["nope"])
    cli = approve_cli()  # tools/approve_guidance.py
    assert cli.main([str(files.folder), "--list"]) == 0 and ids[0] in capsys.readouterr().out
    assert cli.main([str(files.folder), "--discard", ids[1], "--reviewer", "qa"]) == 0
    assert "applied 1, rejected 0, discarded 1, still pending 0; guidance v1" in capsys.readouterr().out
    guidance = json.loads(files.path("guidance.json").read_text(encoding="utf-8"))
    assert [e["text"] for e in guidance["experiences"]] == ["规则A"] and guidance["version"] == 1
    statuses = [(r["status"], r.get("approved_by")) for r in read_jsonl(files.path("reflection.jsonl"))]
    assert statuses[-2:] == [("applied", "qa"), ("discarded", "qa")]
    assert cli.main([str(files.folder), "--list"]) == 0  # nothing left: said, not silence
    assert "no pending proposals in" in capsys.readouterr().out


def approve_cli() -> Any:
    """``tools/approve_guidance.py`` as a module (tools/ is not a package)."""
    path = config_dir().parent / "tools" / "approve_guidance.py"
    spec = importlib.util.spec_from_file_location("approve_guidance", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ whole runs
@pytest.fixture
def small_stage_a(compose: ComposeFn, tmp_path: Path) -> Path:
    """Two labelled groups (one pass, one fail) of each of two missions, from the synthetic train split."""
    cfg = compose([])
    out = ensure_synthetic(**{k: v for k, v in cfg.synthetic.items()})
    rows = read_jsonl(out / "stage_a_train.jsonl")
    picked = [
        next(r for r in rows if r["mission"] == m and r["label"] == lab)
        for m in (M1, M2)
        for lab in ("pass", "fail")
    ]
    path = tmp_path / "stage_a_small.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in picked), encoding="utf-8")
    return path


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.module.runner.output_dir)


def test_real_tiny_model_run_terminates_and_reports_honestly(compose: ComposeFn, small_stage_a: Path) -> None:
    cfg = compose(
        ["+experiment=stage_b_runner", f"data.train_jsonl={small_stage_a}", "trainer.max_epochs=3", *FAST]
    )
    metrics, objects = train(cfg)
    module = objects["module"]
    assert 1 <= module.epochs_run <= 3 and module.final_results is not None
    for slug in (MISSIONS[M1], MISSIONS[M2]):
        folder = run_dir(cfg) / slug
        assert all((folder / name).is_file() for name in ARTIFACTS), sorted(p.name for p in folder.iterdir())
        assert snapshot_versions(folder) == [0]
        guidance = json.loads((folder / "guidance.json").read_text(encoding="utf-8"))
        reflections = read_jsonl(folder / "reflection.jsonl")
        # Whatever the random model wrote, nothing was applied unless it was a valid operation.
        applied = [r for r in reflections if r["status"] == "applied"]
        assert len(guidance["experiences"]) == len(applied) == 0
        assert {r["status"] for r in reflections} <= {
            "invalid_output",
            "rejected",
            "no_operations",
            "no_mistakes",
        }
        assert len(read_jsonl(folder / "trajectories.jsonl")) == 2 * 2 * module.epochs_run
    selections = [
        r
        for slug in (MISSIONS[M1], MISSIONS[M2])
        for r in read_jsonl(run_dir(cfg) / slug / "selections.jsonl")
    ]
    last = [r for r in selections if r["epoch"] == module.epochs_run - 1]
    assert len(last) == 4
    assert metrics["train/invalid_rate"] == sum(r["verdict"] is None for r in last) / 4
    assert metrics["train/accuracy"] == sum(r["label_match"] is True for r in last) / 4
    queue = [
        r
        for slug in (MISSIONS[M1], MISSIONS[M2])
        for r in read_jsonl(run_dir(cfg) / slug / "manual_review_queue.jsonl")
    ]
    assert len(queue) == sum(r["verdict"] is None for r in last) == metrics["runner/manual_review"]
    assert metrics["reflection/applied"] == 0 and (Path(cfg.paths.output_dir) / "metrics.json").is_file()


class ScriptedEngine:
    """Same ``generate`` as GenerationEngine; answers from the conversation text, records every call.

    Used only where the tiny random model cannot drive the control flow (valid verdicts, JSON reflections).
    """

    def __init__(self, reflection_system: str, answer: Callable[[str, SamplingParams], list[str]],
                 reflect: Callable[[str], str]) -> None:  # fmt: skip
        self.reflection_system, self.answer, self.reflect = reflection_system, answer, reflect
        self.calls: list[tuple[str, list[str], SamplingParams]] = []

    def generate(
        self, conversations: Sequence[Sequence[dict]], params: SamplingParams
    ) -> list[list[Completion]]:
        kind = "reflection" if conversations[0][0]["content"] == self.reflection_system else "rollout"
        users = [conv[1]["content"] for conv in conversations]
        self.calls.append((kind, users, params))
        texts = [[self.reflect(u)] if kind == "reflection" else self.answer(u, params) for u in users]
        return [[Completion(i, t, [], False) for t in ts] for i, ts in enumerate(texts)]


def scripted(
    cfg: DictConfig, small_stage_a: Path, final_temperature: float = 0.123
) -> tuple[ScriptedEngine, dict[str, Any]]:
    """Epoch 0: everything 通过 (fail groups are false passes) -> each mission's reflection adds a rule (plus
    bad operations that must be rejected). Epoch 1, prompts with the rule: right verdicts, but one mission's
    pass group gets one invalid rollout (rollouts disagree) -> its reflection proposes nothing. Final rollout
    (distill temperature): right verdicts except a conflict (label fail, 通过) on the first fail group."""
    groups = {format_summaries(r["per_image"].values()): r for r in read_jsonl(small_stage_a)}
    conflict_key = next(r["ticket_key"] for r in groups.values() if r["label"] == "fail")

    def group_of(user: str) -> dict[str, Any]:
        return next(r for s, r in groups.items() if s in user)

    def answer(user: str, params: SamplingParams) -> list[str]:
        g = group_of(user)
        right = "通过" if g["label"] == "pass" else "不通过"
        if params.temperature == final_temperature:
            verdict = "通过" if g["ticket_key"] == conflict_key else right
            return [f"{verdict}\n理由: 终轮回答{k}。" for k in range(params.num_return_sequences)]
        if "RULE-" not in user:
            return ["通过\n理由: 图片_1设备齐全。"] * params.num_return_sequences
        texts = [f"{right}\n理由: 依据规则判断。"] * params.num_return_sequences
        if g["mission"] == M1 and g["label"] == "pass":
            texts[-1] = "我不确定"
        return texts

    def reflect(user: str) -> str:
        if "RULE-" in user:
            return '{"operations": []}'
        evidence = [TICKET.findall(user)[0]]
        slug = MISSIONS[M1] if M1 in user else MISSIONS[M2]
        good = {
            "op": "add",
            "text": f"RULE-{slug}: 关键螺丝不符合要求即不通过",
            "evidence": evidence,
            "reason": "误放行",
        }
        bad = [{"op": "edit", "id": "G7", "text": "x", "evidence": evidence, "reason": "r"},
               {"op": "add", "text": "y", "evidence": ["QC-X-00000000-0::fail"], "reason": "r"}]  # fmt: skip
        return json.dumps({"operations": [good, *bad]}, ensure_ascii=False)

    return ScriptedEngine(cfg.prompts.reflection.system, answer, reflect), groups


def test_scripted_flow_apply_inject_converge_distill(
    compose: ComposeFn, small_stage_a: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = ["+experiment=distill", f"data.train_jsonl={small_stage_a}", "trainer.max_epochs=5", "logger=csv",
                 "stage_b_distillation.distill_temperature=0.123", *FAST]  # fmt: skip
    cfg = compose(overrides)
    engine, groups = scripted(cfg, small_stage_a)
    monkeypatch.setattr(engine_module, "GenerationEngine", lambda *args, **kwargs: engine)
    metrics, objects = train(cfg)
    module = objects["module"]
    # two reflection rounds, then the final rollout; the run stopped long before max_epochs=5
    assert module.epochs_run == 3 and metrics["runner/converged"] == 1.0
    rollouts = [users for kind, users, _ in engine.calls if kind == "rollout"]
    assert not any("RULE-" in u for u in rollouts[0])
    assert all("G0. RULE-" in u for u in rollouts[1]) and all("G0. RULE-" in u for u in rollouts[2])
    for mission in (M1, M2):
        folder = run_dir(cfg) / MISSIONS[mission]
        guidance = json.loads((folder / "guidance.json").read_text(encoding="utf-8"))
        assert guidance["version"] == 1 and [e["id"] for e in guidance["experiences"]] == ["G0"]
        assert snapshot_versions(folder) == [0, 1]
        rows = read_jsonl(folder / "reflection.jsonl")
        applied = [r for r in rows if r["status"] == "applied"]
        assert len(applied) == 1 and applied[0]["evidence"][0] in {g["ticket_key"] for g in groups.values()}
        assert applied[0]["reason"] == "误放行" and applied[0]["reflection_id"].endswith(
            f"epoch0/{MISSIONS[mission]}"
        )
        assert sorted(r["code"] for r in rows if r["status"] == "rejected") == [
            "unknown_evidence",
            "unknown_id",
        ]
        assert {r["status"] for r in rows if r["epoch"] == 1} == (
            {"no_operations"} if mission == M1 else {"no_mistakes"}
        )
        selections = read_jsonl(folder / "selections.jsonl")
        assert {"vote_strength", "label_match", "conflict_flag"} <= set(selections[0])
        assert len(selections) == 2 * 3 and len(read_jsonl(folder / "trajectories.jsonl")) == 2 * 2 * 3
    assert (
        metrics["reflection/applied"] == 0 and metrics["train/accuracy"] == 0.75
    )  # last epoch: the final rollout
    distill = next(c for c in objects["callbacks"] if isinstance(c, DistillationCallback))
    assert sorted(distill.written) == sorted([M1, M2])
    final_prompts = set(rollouts[2])
    for path in distill.written.values():
        for row in read_jsonl(path):
            system, user, assistant = row["messages"]
            assert user["content"] in final_prompts and system["content"] == cfg.prompts.stage_b.system
            assert assistant["content"].endswith("终轮回答0。")  # the last rollout only, no reflection text
            assert row["conflict"] == (row["label"] == "fail" and row["verdict"] == "pass")
            assert row["weight"] == (0.5 if row["conflict"] else 1.0) and row["distill_temperature"] == 0.123
    assert metrics["distill/rows"] == 4 and metrics["distill/conflicts"] == metrics["distill/marked"] == 1


def test_scripted_review_mode_stops_without_changing_guidance(
    compose: ComposeFn, small_stage_a: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    initial = tmp_path / "initial_guidance.json"
    initial.write_text(json.dumps({M1: {"experiences": ["初始经验"]}}, ensure_ascii=False), encoding="utf-8")
    cfg = compose(["+experiment=stage_b_runner", f"data.train_jsonl={small_stage_a}", f"data.guidance_path={initial}",
                   "logger=none", "module.runner.review_mode=true", *FAST])  # fmt: skip
    engine, _ = scripted(cfg, small_stage_a)
    monkeypatch.setattr(engine_module, "GenerationEngine", lambda *args, **kwargs: engine)
    metrics, objects = train(cfg)
    assert objects["module"].epochs_run == 1 and metrics["reflection/pending"] == 2
    assert all(
        ("G0. 初始经验" in user) == (M1 in user) for user in engine.calls[0][1]
    )  # initial guidance injected
    folder = run_dir(cfg) / MISSIONS[M1]
    experiences = json.loads((folder / "guidance.json").read_text(encoding="utf-8"))["experiences"]
    assert [e["text"] for e in experiences] == ["初始经验"]  # review mode: unchanged until approved
    assert len(read_jsonl(folder / "pending_proposals.jsonl")) == 1
    assert review_pending(folder, approve=None).version == 1


class Crash(RuntimeError):
    """Stands for ``kill -9``: nothing after it runs (no epoch end, no progress update)."""


def crash_at(engine: ScriptedEngine, kind: str, nth: int, signum: int | None = None) -> ScriptedEngine:
    """``engine`` failing on its ``nth`` call of ``kind`` (counted from now), or sending this process
    ``signum`` during that call (which then completes, as the item in hand)."""
    calls = {"n": 0}
    generate = engine.generate

    def failing(conversations: Sequence[Sequence[dict]], params: SamplingParams) -> list[list[Completion]]:
        is_kind = (conversations[0][0]["content"] == engine.reflection_system) == (kind == "reflection")
        calls["n"] += is_kind
        if is_kind and calls["n"] == nth and signum is not None:
            os.kill(os.getpid(), signum)
        elif is_kind and calls["n"] == nth:
            raise Crash(f"{kind} call {nth}")
        return generate(conversations, params)

    engine.generate = failing  # type: ignore[method-assign]
    return engine


def comparable(folder: Path) -> dict[str, Any]:
    """A mission folder's rows and guidance without what names the run (run ids differ between runs)."""

    def strip(row: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in row.items() if k not in ("run_id", "reflection_id")}

    rows = {
        name: [strip(r) for r in read_jsonl(folder / name)] for name in ARTIFACTS if name.endswith(".jsonl")
    }
    guidance = json.loads((folder / "guidance.json").read_text(encoding="utf-8"))
    return {**rows, "guidance": {k: v for k, v in guidance.items() if k != "updated_at"}}


def test_rerun_after_kills_resumes_the_epoch_budget_and_discards_partial_epochs(
    compose: ComposeFn, small_stage_a: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def run(out: Path, kind: str | None = None, nth: int = 0) -> dict[str, float]:
        overrides = ["+experiment=distill", f"data.train_jsonl={small_stage_a}", "trainer.max_epochs=5",
                     "logger=none", "data.batch_size=2", f"module.runner.output_dir={out}", *FAST]  # fmt: skip
        cfg = compose(overrides)
        engine, _ = scripted(
            cfg, small_stage_a, final_temperature=cfg.stage_b_distillation.distill_temperature
        )
        if kind:
            crash_at(engine, kind, nth)
        monkeypatch.setattr(engine_module, "GenerationEngine", lambda *args, **kwargs: engine)
        return train(cfg)[0]

    reference = run(tmp_path / "reference")
    killed = tmp_path / "killed"
    with pytest.raises(Crash):
        run(killed, "rollout", 4)  # epoch 1: one batch of trajectories written, the other not
    with pytest.raises(Crash):
        run(killed, "reflection", 1)  # resumed epoch 1: trajectories and selections written, reflection not
    resumed = run(killed)
    assert resumed["runner/epochs"] == reference["runner/epochs"] == 3  # not 3 more: the budget continues
    for mission in (M1, M2):
        assert comparable(killed / MISSIONS[mission]) == comparable(
            tmp_path / "reference" / MISSIONS[mission]
        )
        epochs = [r["epoch"] for r in read_jsonl(killed / MISSIONS[mission] / "trajectories.jsonl")]
        assert epochs == sorted(epochs) and epochs.count(1) == 2 * 2  # epoch 1 once, whole
    progress = json.loads((killed / "runner_progress.json").read_text(encoding="utf-8"))
    assert progress["finished"] and progress["epochs_done"] == 3


def test_sigterm_mid_epoch_discards_the_epoch_and_the_rerun_resumes(
    compose: ComposeFn, small_stage_a: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def run(out: Path, signum: int | None = None) -> dict[str, float]:
        overrides = ["+experiment=stage_b_runner", f"data.train_jsonl={small_stage_a}", "trainer.max_epochs=3",
                     "logger=none", "data.batch_size=2", f"module.runner.output_dir={out}", *FAST]  # fmt: skip
        cfg = compose(overrides)
        engine, _ = scripted(cfg, small_stage_a)
        if signum is not None:
            crash_at(engine, "rollout", 3, signum)  # epoch 1, first of its two batches
        monkeypatch.setattr(engine_module, "GenerationEngine", lambda *args, **kwargs: engine)
        return train(cfg)[0]

    run(tmp_path / "reference")
    with pytest.raises(Interrupted) as stop:
        run(tmp_path / "stopped", signal.SIGTERM)
    assert stop.value.exit_code == 143
    progress = json.loads((tmp_path / "stopped" / "runner_progress.json").read_text(encoding="utf-8"))
    assert progress["epochs_done"] == 1 and not progress["finished"]  # epoch 1 was not reflected on
    run(tmp_path / "stopped")
    for mission in (M1, M2):
        assert comparable(tmp_path / "stopped" / MISSIONS[mission]) == comparable(
            tmp_path / "reference" / MISSIONS[mission]
        )
