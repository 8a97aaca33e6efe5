"""Teacher distillation: chatml rows and conflict policies, atomic overwrite under ``kill -9``, a scripted
Teacher run whose file the fusion SFT loader reads, ``tools/distill.py`` on the embedded defaults, and the
OpenAI-compatible HTTP Teacher against a local stand-in server."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import bbuqc_lightning.generation.engine as engine_module
from bbuqc_lightning.config import config_dir
from bbuqc_lightning.data.jsonl import read_jsonl
from bbuqc_lightning.generation.engine import Completion, SamplingParams
from bbuqc_lightning.generation.openai_engine import EndpointError, OpenAICompatibleEngine
from bbuqc_lightning.stage_b.prompts import load_stage_b_templates
from bbuqc_lightning.stage_b.sample import StageBSample
from bbuqc_lightning.stage_b_runner.distill import build_distill_rows, write_distill_file
from bbuqc_lightning.stage_b_runner.guidance import MissionGuidance
from bbuqc_lightning.stage_b_runner.rollout import render_messages
from bbuqc_lightning.stage_b_runner.selection import Candidate, GroupResult, select_candidate
from bbuqc_lightning.train import train

ComposeFn = Callable[[list[str]], DictConfig]
REPO = config_dir().parent
MISSION = "BBU线缆布放要求"
META = {"distill_size": None, "distill_seed": 0, "distill_temperature": 0.3, "teacher": "t"}
FAST = [
    "model=tiny_text",  # the random tiny model: these tests check the plumbing, not the fitted demo Teacher
    "module.runner.num_rollouts=2",
    "module.runner.max_new_tokens=8",
    "module.runner.reflection_max_new_tokens=8",
]


def group(key: str, label: str, texts: list[str]) -> GroupResult:
    summaries = ["光纤/无保护措施,弯曲半径不合理×1", "标签/可以识别×2"]
    sample = StageBSample([], key, f"{key}::{label}", MISSION, label, summaries)
    messages = render_messages(sample, load_stage_b_templates(config_dir() / "prompts" / "stage_b.yaml"),
                               MissionGuidance(MISSION))  # fmt: skip
    candidates = [Candidate.parse(i, t, summaries) for i, t in enumerate(texts)]
    return GroupResult(sample, messages, 0, 1, candidates, select_candidate(candidates))


PASS, FAIL = "通过\n理由: 图片_1光纤齐全。", "<think>\n想\n</think>\n\n不通过\n理由: 图片_1光纤无保护措施。"
GROUPS = [
    group("QC-A-20250101-1", "fail", [PASS, PASS, FAIL]),  # conflict, with a 不通过 rollout to flip to
    group("QC-A-20250101-2", "fail", [PASS, PASS]),  # conflict, no 不通过 rollout: line 1 is replaced
    group("QC-A-20250101-3", "pass", [PASS, "乱码"]),
    group("QC-A-20250101-4", "fail", ["乱码", "乱码"]),  # invalid: not distilled
]


def assert_chatml_rows(rows: Sequence[dict[str, Any]]) -> None:
    """The SPEC §8 schema: system + user + assistant (two-line answer, no think block) plus metadata."""
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["system", "user", "assistant"], roles
        assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
        answer = row["messages"][2]["content"]
        assert "<think>" not in answer and len(answer.splitlines()) == 2
        assert {"ticket_key", "group_id", "mission", "label", "weight", "conflict", "distill_size", "distill_seed",
                "distill_temperature"} <= set(row)  # fmt: skip


def load_as_fusion_chat_source(path: Path, tmp_path: Path) -> list[dict[str, Any]]:
    """Read ``path`` the way the fusion SFT does, as a ``dataset: chat``, ``template: chatml`` target."""
    fusion_config = pytest.importorskip("bbuqc_lightning.fusion_sft.fusion_config")
    fusion_rows = pytest.importorskip("bbuqc_lightning.fusion_sft.rows")
    entry = {
        "name": "stage_b_distill",
        "dataset": "chat",
        "train_jsonl": str(path),
        "template": "chatml",
        "ratio": 1.0,
    }
    fusion_yaml = tmp_path / "fusion_distill.yaml"
    fusion_yaml.write_text(json.dumps({"targets": [entry]}), encoding="utf-8")  # JSON is YAML
    config = fusion_config.load_fusion_config(fusion_yaml)
    samples, skipped = fusion_rows.read_entry_samples(
        config.targets[0], "train", lambda t, m: "", strict=True
    )
    assert skipped == 0
    return samples


# ------------------------------------------------------------------------------------------ rows
@pytest.mark.parametrize("policy", ["drop", "flip", "mark"])
def test_conflict_policies(policy: str, tmp_path: Path) -> None:
    rows, counts = build_distill_rows(GROUPS, policy, 0.25, META)
    got = {r["ticket_key"]: r for r in rows[MISSION]}
    assert counts["conflicts"] == 2 and counts["invalid"] == 1 and "QC-A-20250101-4::fail" not in got
    assert got["QC-A-20250101-3::pass"]["messages"][2]["content"] == PASS
    if policy == "drop":
        assert counts["dropped"] == 2 and len(got) == 1
    if policy == "flip":
        assert counts["flipped"] == 2
        assert got["QC-A-20250101-1::fail"]["messages"][2]["content"] == FAIL.split("</think>")[1].strip()
        assert got["QC-A-20250101-2::fail"]["messages"][2]["content"] == "不通过\n理由: 图片_1光纤齐全。"
        assert all(got[k]["verdict"] == "fail" and got[k]["flipped"] for k in got if k.endswith("fail"))
    if policy == "mark":
        assert counts["marked"] == 2 and all(
            got[k]["weight"] == 0.25 and got[k]["conflict"] for k in got if k.endswith("fail")
        )
    assert_chatml_rows(rows[MISSION])
    path = tmp_path / "distill_chatml.jsonl"
    write_distill_file(path, rows[MISSION])
    samples = load_as_fusion_chat_source(path, tmp_path)
    assert [s["weight"] for s in samples] == [r["weight"] for r in rows[MISSION]]


# ------------------------------------------------------------------------------------------ atomic overwrite
WRITER = textwrap.dedent(
    """
    import sys, time
    from bbuqc_lightning.stage_b_runner.distill import write_distill_file

    def rows():
        for i in range(100_000):
            if i == 2000:
                print("MID", flush=True)  # the temporary file holds 2000 rows now; wait to be killed
                time.sleep(120)
            yield {"messages": [{"role": "assistant", "content": "新" * 50}], "i": i}

    write_distill_file(sys.argv[1], rows(), fsync=False)
    """
)


def test_kill_mid_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "bbu_cabling" / "distill_chatml.jsonl"
    write_distill_file(path, [{"old": i} for i in range(3)])
    before = path.read_bytes()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "MID"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    stray = list(path.parent.glob(".distill_chatml.jsonl.*.tmp"))
    assert len(stray) == 1 and stray[0].stat().st_size > 0  # the writer really was mid-write
    assert path.read_bytes() == before  # readers still see the complete old file
    assert write_distill_file(path, [{"new": 1}]) == 1  # the rerun replaces it and clears the leftover
    assert read_jsonl(path) == [{"new": 1}] and not list(path.parent.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------ whole runs
class AgreeingTeacher:
    """Scripted stand-in for the engine (a random tiny model never answers validly): the Teacher answers
    通过 for every group, and its reflection proposes nothing, so the guidance converges at once."""

    def __init__(self, reflection_system: str) -> None:
        self.reflection_system = reflection_system
        self.temperatures: list[float] = []

    def generate(
        self, conversations: Sequence[Sequence[dict]], params: SamplingParams
    ) -> list[list[Completion]]:
        if conversations[0][0]["content"] == self.reflection_system:
            return [[Completion(0, '{"operations": []}', [], False)] for _ in conversations]
        self.temperatures.append(params.temperature)
        answer = f"<think>\n\n</think>\n\n通过\n理由: 温度{params.temperature}下图片_1齐全。"
        return [
            [Completion(i, answer, [], False) for i in range(params.num_return_sequences)]
            for _ in conversations
        ]


def test_scripted_teacher_run_writes_a_fusion_source(
    compose: ComposeFn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose(["+experiment=distill", "logger=none", "data.limit_samples=6", "stage_b_distillation.distill_size=2",
                   "stage_b_distillation.conflict_policy=drop", *FAST])  # fmt: skip
    teacher = AgreeingTeacher(cfg.prompts.reflection.system)
    monkeypatch.setattr(engine_module, "GenerationEngine", lambda *args, **kwargs: teacher)
    metrics, _ = train(cfg)
    # one reflection epoch (2 batches of the 6 groups), then the final rollout on the 2 drawn groups
    assert teacher.temperatures[:2] == [0.7, 0.7] and set(teacher.temperatures[2:]) == {0.3}
    path = Path(cfg.module.runner.output_dir) / "bbu_installation" / "distill_chatml.jsonl"
    rows = read_jsonl(path)
    # distill_size=2 groups drawn from 6; fail-labelled ones conflict with 通过 and are dropped
    assert len(rows) + metrics["distill/dropped"] == 2 and all(r["label"] == "pass" for r in rows)
    assert all(r["messages"][2]["content"] == "通过\n理由: 温度0.3下图片_1齐全。" for r in rows)
    assert_chatml_rows(rows)
    if rows:
        assert len(load_as_fusion_chat_source(path, tmp_path)) == len(rows)


def test_distill_tool_on_embedded_defaults_in_process(
    compose_at: Callable[[list[str], Path, Path], DictConfig],
    tmp_path: Path,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``tools/distill.py`` with the tiny text Teacher (only sizes shrunk for CPU time), in this process: its
    ``main`` prepares the command line (adds ``+experiment=distill``), its Hydra task runs on the composed
    config and prints the report. As its own process: ``test_distill_tool_on_embedded_defaults`` (slow)."""
    spec = importlib.util.spec_from_file_location("distill_tool", REPO / "tools" / "distill.py")
    assert spec and spec.loader
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = ["logger=none", "extras.print_config=false", "data.limit_samples=2", *FAST]
    monkeypatch.setattr(sys, "argv", ["distill.py", *args])
    task = tool.run
    monkeypatch.setattr(tool, "run", lambda: None)  # main() ends by handing sys.argv to Hydra
    tool.main()
    assert sys.argv[1:] == [*args, tool.EXPERIMENT]
    cfg = compose_at(sys.argv[1:], tmp_path, data_dir)
    try:
        task(cfg)  # the @hydra.main task, given its config (Hydra passes a config through)
    finally:
        HydraConfig.instance().cfg = None
    assert_embedded_distill_run(tmp_path / "run", capsys.readouterr().out, tmp_path)


def assert_embedded_distill_run(run: Path, stdout: str, tmp_path: Path) -> None:
    """What ``tools/distill.py`` on 2 embedded samples leaves: the distill file printed and well formed, its
    rows counted in ``metrics.json`` (kept + invalid + dropped = 2), and readable as a fusion chat source."""
    path = run / "stage_b" / "bbu_installation" / "distill_chatml.jsonl"
    assert f"{path}" in stdout and "rows=" in stdout
    rows = read_jsonl(path)
    assert_chatml_rows(rows)  # the random tiny Teacher's answers are invalid: usually no rows, never bad ones
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["distill/rows"] == len(rows) and metrics["distill/rows"] + metrics["distill/invalid_skipped"] + metrics[
        "distill/dropped"] == 2  # fmt: skip
    assert len(load_as_fusion_chat_source(path, tmp_path)) == len(rows)


@pytest.mark.slow
def test_distill_tool_on_embedded_defaults(tmp_path: Path, data_dir: Path) -> None:
    """``python tools/distill.py`` with the tiny text Teacher (only sizes shrunk for CPU time)."""
    run = tmp_path / "run"
    command = [sys.executable, str(REPO / "tools" / "distill.py"), f"hydra.run.dir={run}", f"paths.data_dir={data_dir}",
               "logger=none", "extras.print_config=false", "data.limit_samples=2", *FAST]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_embedded_distill_run(run, result.stdout, tmp_path)


# ------------------------------------------------------------------------------------------ HTTP Teacher
class FakeServer(BaseHTTPRequestHandler):
    """A stand-in OpenAI-compatible server: 通过 for Stage-B prompts, no operations for reflections."""

    requests: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeServer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        if body["messages"][-1]["content"] == "boom":
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b"bad request")
            return
        reflection = '"operations"' in body["messages"][-1]["content"]
        text = '{"operations": []}' if reflection else "<think>\n\n</think>\n\n通过\n理由: 图片_1齐全。"
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                   for i in reversed(range(body["n"]))]  # fmt: skip
        payload = json.dumps({"choices": choices}, ensure_ascii=False).encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[str]:
    FakeServer.requests.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    thread.join()


def test_http_teacher_behind_the_same_interface(
    compose: ComposeFn, fake_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEACHER_KEY", "secret")
    engine = ["generation=openai", f"generation.base_url={fake_server}", "generation.model=Qwen/Qwen3-32B",
              "generation.api_key_env=TEACHER_KEY", "generation.enable_thinking=true"]  # fmt: skip
    cfg = compose(["+experiment=distill", "logger=none", "data.limit_samples=2", *engine, *FAST])
    metrics, _ = train(cfg)
    rows = read_jsonl(Path(cfg.module.runner.output_dir) / "bbu_installation" / "distill_chatml.jsonl")
    assert (
        metrics["runner/epochs"] == 2
        and len(rows) + metrics["distill/marked"] == 2 + metrics["distill/marked"]
    )
    assert all(
        r["teacher"] == "Qwen/Qwen3-32B" and r["messages"][2]["content"] == "通过\n理由: 图片_1齐全。"
        for r in rows
    )
    first = FakeServer.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer secret"
    assert (first["model"], first["n"], first["max_tokens"], first["temperature"]) == (
        "Qwen/Qwen3-32B",
        2,
        8,
        0.7,
    )
    assert first["chat_template_kwargs"] == {"enable_thinking": True}
    bad = OpenAICompatibleEngine(base_url=fake_server, model="m", retries=0)
    with pytest.raises(EndpointError, match=r"chat/completions: HTTP 400: bad request"):
        bad.generate([[{"role": "user", "content": "boom"}]], SamplingParams())
