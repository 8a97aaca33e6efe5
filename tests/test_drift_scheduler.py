"""The drift/cure pipeline's DAG, concurrent scheduler and bundle, without models: the plan's edges, the cuda
plan as one run and as calls of under 10 minutes, and the scheduler on trivial ``python -c`` steps run through the real
``run_planned`` / ``run_step`` path (concurrency and ``--jobs`` shown by marker files, never by timing; the
budget by an injected clock; failure isolation; resume after the main process is killed); the bundle's limits.
The real steps run in ``tests/test_drift_and_cure.py``'s slow CPU smoke test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bbuqc_lightning.constants import GPU_RESERVED_KEY

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import drift_and_cure as pipeline  # noqa: E402
from proof import bundle, dag, drift_plan, scheduler  # noqa: E402
from proof import runs as proof_runs  # noqa: E402
from proof.drift_plan import PlannedStep  # noqa: E402
from proof.runs import Step  # noqa: E402

WAIT = """import pathlib, sys, time
def wait(path, seconds=120):
    end = time.time() + seconds
    while not pathlib.Path(path).exists():
        if time.time() > end:
            sys.exit(f"timed out waiting for {path}")
        time.sleep(0.02)
"""


def fake(
    name: str, code: str, after: tuple[str, ...] = (), run_dir: Path | None = None, minutes: float = 0.1
):
    """A step whose one command is ``python -c <code>`` (``wait(path)`` available)."""
    return PlannedStep(
        name, [Step("cmd", [sys.executable, "-c", WAIT + code], run_dir)], minutes, after=list(after)
    )


def touch(path: Path) -> str:
    return f"pathlib.Path({str(path)!r}).touch()\n"


def settings_for(tmp_path: Path) -> dict:
    return {"out": str(tmp_path / "out")}


def test_the_plan_dag_has_the_right_edges(tmp_path: Path) -> None:
    s = pipeline.settings(pipeline.parse_args(["--device", "cuda", "--out", str(tmp_path / "out")]))
    plan = drift_plan.build_plan(s)
    expected = {("data", "teacher"), ("teacher", "distill")}
    for k in (0, 1):
        b, d = f"s{k}/base", f"s{k}/drift_lenient"
        expected |= {("data", b), (b, d), (d, f"s{k}/cure_a"), ("distill", f"s{k}/cure_a")}
        expected |= {(d, f"s{k}/cure_b"), (d, f"s{k}/cure_b_penalty")}
        for stage in ("base", "drift_lenient", "cure_a", "cure_b", "cure_b_penalty"):
            expected.add((f"s{k}/{stage}", f"s{k}/eval_{stage}"))
    assert dag.edges(plan) == expected
    names = [p.name for p in plan]  # the plan's order is a topological order
    assert all(names.index(a) < names.index(b) for a, b in expected)
    waves = [[step.name for step in wave] for wave in dag.waves(plan)]
    assert waves[0] == ["data"] and set(waves[1]) == {"s0/base", "s1/base", "teacher"}
    assert dag.waves(plan, {"data": {}, "teacher": {}})[0][0].name == "s0/base"
    other = pipeline.settings(
        pipeline.parse_args(
            ["--device", "cpu", "--out", str(tmp_path / "b"), "--teacher", "base", "--seeds", "2"]
        )
    )
    assert ("s2/base", "distill") in dag.edges(drift_plan.build_plan(other))


def test_the_cuda_plan_fits_one_run_or_three_calls_of_nine_minutes(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        proof_runs, "gpu_memory_gb", lambda device: None
    )  # plan for an H100 whatever card is here
    out = str(tmp_path / "out")
    s = pipeline.settings(pipeline.parse_args(["--device", "cuda", "--out", out]))
    plan = drift_plan.build_plan(s)
    assert len(dag.simulate(plan, jobs=4, max_minutes=24)) == 1  # the measured protocol: one run
    calls = dag.simulate(plan, jobs=4, max_minutes=9)
    assert len(calls) <= 3 and all(c.minutes < 10 for c in calls) and sum(c.minutes for c in calls) <= 28
    runs = [r for c in calls for r in c.runs]
    assert sorted(r[0] for r in runs) == sorted(p.name for p in plan)  # each step once
    when = {name: (i, start, end) for i, c in enumerate(calls) for name, start, end in c.runs}
    for before, after in dag.edges(plan):  # a dependant starts after its inputs, in that call or a later one
        assert when[before][0] < when[after][0] or when[before][2] <= when[after][1]
    for c in calls:
        for _, start, _ in c.runs:
            assert sum(s0 <= start < e0 for _, s0, e0 in c.runs) <= 4
    # on an 80 GB H100 (what --plan assumes without the GPU): never more memory at once than the card has
    memory = {p.name: p.memory_gb for p in plan}
    assert memory["s0/base"] > 40 and memory["teacher"] > 20 and memory["data"] == 0
    budget = 79.2 - dag.GPU_RESERVE_GB
    assert len(dag.simulate(plan, jobs=4, max_minutes=32, gpu_memory_gb=budget)) == 1
    h100 = dag.simulate(plan, jobs=4, max_minutes=9, gpu_memory_gb=budget)
    assert len(h100) == 4 and all(c.minutes < 10 for c in h100)
    assert sorted(r[0] for c in h100 for r in c.runs) == sorted(p.name for p in plan)
    for c in h100:
        for _, start, _ in c.runs:
            assert sum(memory[n] for n, s0, e0 in c.runs if s0 <= start < e0) <= budget
    assert pipeline.main(["--device", "cuda", "--out", out, "--plan"]) == 0
    text = capsys.readouterr().out
    assert f"{len(h100)} call(s)" in text and "wave 1: " in text and "78 GB of GPU memory" in text
    assert f'--out {out} --jobs 4 --max-minutes 9 --bundle "$OUT"' in text
    assert pipeline.main(["--device", "cuda", "--out", out, "--plan", "--gpu-memory-gb", "0"]) == 0
    text = capsys.readouterr().out
    assert f"{len(calls)} call(s)" in text and "no GPU memory budget" in text
    assert "--max-minutes 9 --gpu-memory-gb 0 --bundle" in text  # each call runs as planned
    # --steps: the calls of those steps alone (run 6 left the penalty arm out to fit its hold)
    penalty = [n for n in (p.name for p in plan) if "penalty" in n]
    kept = ",".join(p.name for p in plan if p.name not in penalty)
    assert (
        pipeline.main(["--device", "cuda", "--out", out, "--plan", "--max-minutes", "24", "--steps", kept])
        == 0
    )
    text = capsys.readouterr().out
    timeline = text[text.index("call(s)") :]
    assert not any(name in timeline for name in penalty) and f"--steps {kept}" in timeline
    assert "not run with these --steps" not in text
    # a named step whose input is left out cannot run, and says so
    assert (
        pipeline.main(["--device", "cuda", "--out", out, "--plan", "--steps", "s0/cure_a,s0/eval_cure_a"])
        == 0
    )
    text = capsys.readouterr().out
    assert "not run with these --steps (each needs a step left out): s0/cure_a, s0/eval_cure_a" in text


def test_independent_steps_run_concurrently_and_dependants_after(tmp_path: Path) -> None:
    m = tmp_path / "m"
    m.mkdir()
    plan = [  # a and b wait for each other: they finish only if both run at once
        fake("a", touch(m / "a.start") + f"wait({str(m / 'b.start')!r})\n" + touch(m / "a.end")),
        fake("b", touch(m / "b.start") + f"wait({str(m / 'a.start')!r})\n" + touch(m / "b.end")),
        fake("c", f"assert pathlib.Path({str(m / 'a.end')!r}).exists() and pathlib.Path({str(m / 'b.end')!r}).exists()\n"
             + touch(m / "c.end"), after=("a", "b")),
    ]  # fmt: skip
    s, done = settings_for(tmp_path), {}
    outcome = pipeline.run_plan(s, plan, ["a", "b", "c"], done, jobs=2, report=False)
    assert outcome.ok and outcome.finished[-1] == "c" and (m / "c.end").exists()
    assert set(pipeline.load_done(Path(s["out"]))) == {"a", "b", "c"}
    assert (Path(s["out"]) / "logs" / "a.cmd.log").is_file()


def test_a_step_records_the_gpu_memory_its_process_reserved(tmp_path: Path) -> None:
    """From the run's metrics.json (``train`` writes ``gpu/max_memory_reserved_gb`` on a GPU); None without it."""
    gpu, cpu = tmp_path / "gpu", tmp_path / "cpu"
    write = "pathlib.Path({!r}).mkdir(); pathlib.Path({!r}, 'metrics.json').write_text({!r})\n"
    plan = [
        fake("g", write.format(str(gpu), str(gpu), json.dumps({GPU_RESERVED_KEY: 30.456})), run_dir=gpu),
        fake("c", write.format(str(cpu), str(cpu), '{"test/accuracy": 1.0}'), run_dir=cpu),
    ]
    s, done = settings_for(tmp_path), {}
    assert pipeline.run_plan(s, plan, ["g", "c"], done, jobs=1, report=False).ok
    recorded = pipeline.load_done(Path(s["out"]))
    assert recorded["g"]["commands"][0]["gpu_reserved_gb"] == 30.46
    assert recorded["c"]["commands"][0]["gpu_reserved_gb"] is None
    # a step that fails (out of memory, say) gives the peak its process wrote before exiting
    failed = tmp_path / "failed"
    code = write.format(str(failed), str(failed), json.dumps({GPU_RESERVED_KEY: 77.04})) + "sys.exit('oom')\n"
    outcome = pipeline.run_plan(s, [fake("f", code, run_dir=failed)], ["f"], done, jobs=1, report=False)
    assert "failed (exit 1; GPU memory reserved at peak 77.0 GiB)" in outcome.failed["f"]


def test_jobs_bounds_the_processes_running_at_once(tmp_path: Path) -> None:
    running, peaks = tmp_path / "running", tmp_path / "peaks"
    running.mkdir()
    peaks.mkdir()

    def step(name: str, partner: str) -> PlannedStep:
        code = (
            touch(running / name)
            + f"pathlib.Path({str(peaks / name)!r}).write_text(str(len(list(pathlib.Path({str(running)!r}).iterdir()))))\n"
            + f"wait({str(peaks / partner)!r})\npathlib.Path({str(running / name)!r}).unlink()\n"
        )
        return fake(name, code)

    plan = [step("a", "b"), step("b", "a"), step("c", "d"), step("d", "c")]
    outcome = pipeline.run_plan(settings_for(tmp_path), plan, "abcd", {}, jobs=2, report=False)
    assert outcome.ok and sorted(outcome.finished) == list("abcd")
    assert max(int((peaks / n).read_text()) for n in "abcd") == 2  # pairs overlapped, never 3 at once


def test_a_step_waits_for_gpu_memory_while_a_smaller_one_starts_beside(tmp_path: Path) -> None:
    m = tmp_path / "m"
    m.mkdir()
    plan = [  # a and c wait for each other: they finish only if c starts beside a; b needs a to have ended
        fake("a", touch(m / "a.start") + f"wait({str(m / 'c.start')!r})\n" + touch(m / "a.end")),
        fake("b", f"assert pathlib.Path({str(m / 'a.end')!r}).exists(), 'b started beside a'\n"),
        fake("c", touch(m / "c.start") + f"wait({str(m / 'a.start')!r})\n"),
    ]  # fmt: skip
    for step, gb in zip(plan, (6.0, 6.0, 3.0), strict=True):
        step.memory_gb = gb
    lines: list[str] = []
    outcome = scheduler.run_dag(plan, "abc", {}, jobs=3, execute=lambda step: pipeline.run_planned(step, m),
                                on_finish=lambda name, record: None, gpu_memory_gb=10, log=lines.append)  # fmt: skip
    assert outcome.ok and sorted(outcome.finished) == ["a", "b", "c"]
    assert any("b waits for GPU memory: ~6 GB beside ~6 GB running, budget 10 GB" in line for line in lines)
    # a step over the whole budget still runs, alone: after a, not beside it
    (m / "a.end").unlink()
    plan[1].memory_gb = 50.0
    alone = scheduler.run_dag(plan[:2], "ab", {}, jobs=2, execute=lambda step: pipeline.run_planned(step, m),
                              on_finish=lambda n, r: None, gpu_memory_gb=10, log=lambda _: None)  # fmt: skip
    assert alone.ok and alone.finished == ["a", "b"]


def test_a_step_out_of_gpu_memory_beside_others_runs_again_alone(tmp_path: Path) -> None:
    m = tmp_path / "m"
    m.mkdir()
    oom = "print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 910.00 MiB')\nsys.exit(1)\n"
    plan = [  # b's first try fails beside a; a ends only once the scheduler has seen that, and b's retry needs a ended
        fake("a", touch(m / "a.start") + f"wait({str(m / 'b.noticed')!r})\n" + touch(m / "a.end")),
        fake("b", f"wait({str(m / 'a.start')!r})\nfirst = pathlib.Path({str(m / 'b.first')!r})\n"
             f"if not first.exists():\n    first.touch()\n    " + oom.replace("\n", "\n    ").rstrip() + "\n"
             f"assert pathlib.Path({str(m / 'a.end')!r}).exists(), 'the retry ran beside a'\n"),
        fake("b2", "", after=("b",)),
    ]  # fmt: skip
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if "b ran out of GPU memory" in line:
            (m / "b.noticed").touch()

    records: dict[str, dict] = {}
    outcome = scheduler.run_dag(plan, ["a", "b", "b2"], {}, jobs=2, execute=lambda step: pipeline.run_planned(step, m),
                                on_finish=records.__setitem__, log=log)  # fmt: skip
    assert outcome.ok and sorted(outcome.finished) == ["a", "b", "b2"]
    assert any("b ran out of GPU memory beside a: it runs again alone" in line for line in lines)
    # b (the longer chain) started first and a beside it; b's retry started with nothing else running
    starts = [
        line.split("] start ")[1].split(" (")[0] + ", " + line.rpartition(", ")[2]
        for line in lines
        if "] start " in line
    ]
    assert starts[:3] == ["b, 1 running)", "a, 2 running)", "b, 1 running)"]
    assert records["b"]["retried_alone"] is True and "retried_alone" not in records["a"]
    assert "CUDA out of memory" in (m / "b.cmd.previous.log").read_text()  # the first try's log is kept
    # out of memory alone is a failure (no second try)
    alone = scheduler.run_dag([fake("c", oom)], ["c"], {}, jobs=2, execute=lambda step: pipeline.run_planned(step, m),
                              on_finish=lambda n, r: None, log=lambda _: None)  # fmt: skip
    assert list(alone.failed) == ["c"] and "CUDA out of memory" in alone.failed["c"]


def test_the_bundle_is_rewritten_after_every_finished_step(tmp_path: Path) -> None:
    """A call cut off mid-way still leaves what it finished in ``--bundle``: b (after a) finds a's log there."""
    dest = tmp_path / "bundle"
    check = (
        "import tarfile\n"
        f"with tarfile.open({str(dest / 'logs.tar.gz')!r}) as tar:\n"
        "    names = tar.getnames()\n"
        "assert 'logs/a.cmd.log' in names and 'state.json' in names, names\n"
    )
    plan = [fake("a", "print('a ran')\n"), fake("b", check, after=("a",))]
    outcome = pipeline.run_plan(
        settings_for(tmp_path), plan, ["a", "b"], {}, jobs=1, report=False, bundle_dir=dest
    )
    assert outcome.ok and outcome.finished == ["a", "b"]
    assert sorted(p.name for p in dest.iterdir()) == ["bundle.json", "logs.tar.gz"]  # no temporary file left


def test_a_failed_step_stops_only_its_dependants(tmp_path: Path) -> None:
    plan = [
        fake("a", "sys.exit('broken on purpose')"),
        fake("a2", "", after=("a",)),
        fake("b", ""),
        fake("b2", "", after=("b",)),
        fake("c", "", after=("a2", "b2")),
    ]
    s = settings_for(tmp_path)
    outcome = pipeline.run_plan(s, plan, [p.name for p in plan], {}, jobs=2, report=False)
    assert list(outcome.failed) == ["a"] and "broken on purpose" in outcome.failed["a"]
    assert set(outcome.blocked) == {"a2", "c"} and sorted(outcome.finished) == ["b", "b2"]
    assert set(pipeline.load_done(Path(s["out"]))) == {"b", "b2"}
    assert "broken on purpose" in (Path(s["out"]) / "logs" / "a.cmd.log").read_text()


def test_max_minutes_leaves_what_would_not_fit_for_the_next_call() -> None:
    plan = [fake("a", "", minutes=1), fake("big", "", minutes=20), fake("after_big", "", ("big",), minutes=1),
            fake("d", "", ("a",), minutes=8), fake("e", "", minutes=5)]  # fmt: skip
    clock, ran = [0.0], []

    def execute(step: PlannedStep) -> dict:
        ran.append(step.name)
        return {}

    def finished(name: str, record: dict) -> None:  # the injected clock: each step takes its estimate
        clock[0] += next(p.minutes for p in plan if p.name == name)

    outcome = scheduler.run_dag(plan, [p.name for p in plan], {}, jobs=1, execute=execute, on_finish=finished,
                                max_minutes=10, elapsed=lambda: clock[0], log=lambda _: None)  # fmt: skip
    assert ran == ["a", "d"] and sorted(outcome.left) == ["after_big", "big", "e"] and outcome.ok
    calls = dag.simulate([p for p in plan if "big" not in p.name], jobs=1, max_minutes=10)
    assert [[r[0] for r in c.runs] for c in calls] == [["a", "d"], ["e"]]  # the scheduler's choices
    with pytest.raises(ValueError, match="big: longer than"):
        dag.simulate(plan, {"a": {}, "d": {}, "e": {}}, jobs=1, max_minutes=10)


DRIVER = """import sys
sys.path.insert(0, {bench!r})
from test_drift_scheduler_plan import build
import drift_and_cure as pipeline
s = {{"out": {out!r}}}
plan = build({m!r})
done = pipeline.load_done(pipeline.Path(s["out"]))
outcome = pipeline.run_plan(s, plan, [p.name for p in plan if p.name not in done], done, jobs=2, report=False)
sys.exit(0 if outcome.ok else 1)
"""
PLAN = """import sys
from pathlib import Path
from proof.drift_plan import PlannedStep
from proof.runs import Step
WAIT = {wait!r}

def build(m):
    m = Path(m)
    def step(name, code, after=(), run_dir=None):
        return PlannedStep(name, [Step("cmd", [sys.executable, "-c", WAIT + code], run_dir)], 0.1, after=list(after))
    b_dir = m / "b_run"
    return [
        step("a", f"open({{str(m / 'a.runs')!r}}, 'a').write('x')\\n"),
        step("b", f"d = pathlib.Path({{str(b_dir)!r}})\\nd.mkdir(parents=True, exist_ok=True)\\n"
             f"(d / 'started').touch()\\nwait({{str(m / 'go')!r}})\\n(d / 'model').write_text('ok')\\n",
             ("a",), b_dir),
        step("c", ""),
    ]
"""


def test_resume_after_the_main_process_is_killed(tmp_path: Path) -> None:
    m, out = tmp_path / "m", tmp_path / "out"
    m.mkdir()
    (tmp_path / "test_drift_scheduler_plan.py").write_text(PLAN.format(wait=WAIT), encoding="utf-8")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(bench=str(BENCH), out=str(out), m=str(m)), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(BENCH), str(BENCH.parent)])}
    first = subprocess.Popen([sys.executable, str(driver)], cwd=tmp_path, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120  # waiting for markers, not measuring anything
        while not ((m / "b_run" / "started").exists() and set(pipeline.load_done(out)) == {"a", "c"}):
            assert first.poll() is None and time.time() < deadline, "the first call ended early"
            time.sleep(0.02)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the main process and its step subprocesses
        first.wait()
    assert set(json.loads((out / "state.json").read_text())["done"]) == {"a", "c"}  # b was cut off
    (m / "b_run" / "stale").write_text("left by the killed call")
    (m / "go").touch()
    second = subprocess.run([sys.executable, str(driver)], cwd=tmp_path, env=env, timeout=300)
    assert second.returncode == 0
    assert set(pipeline.load_done(out)) == {"a", "b", "c"}
    assert (m / "a.runs").read_text() == "x"  # a ran once
    assert (
        not (m / "b_run" / "stale").exists() and (m / "b_run" / "model").read_text() == "ok"
    )  # b from scratch


def test_bundle_is_at_most_eight_files_each_under_the_limit(tmp_path: Path) -> None:
    out, dest = tmp_path / "out", tmp_path / "OUT"
    for name in bundle.REPORT_FILES:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    (out / "logs").mkdir()
    (out / "logs" / "s0_base.base.log").write_bytes(os.urandom(300_000))  # incompressible: forces a cut
    (out / "logs" / "data.data.log").write_text("ok\n")
    (out / "state.json").write_text("{}")
    for run in ("s0/eval_base/stage_b", "s0/eval_base/e2e"):
        (out / "runs" / run).mkdir(parents=True)
        (out / "runs" / run / "metrics.json").write_text('{"test/accuracy": 1.0}')
    (out / "runs" / "s0" / "eval_base" / "e2e" / "stage_a.jsonl").write_text(
        "{}\n"
    )  # the model's own summaries
    (out / "runs" / "s0" / "base" / "model").mkdir(parents=True)
    (out / "runs" / "s0" / "base" / "model" / "model.safetensors").write_bytes(b"0" * 1000)
    files = out / "wandb" / "offline-run-1" / "files"
    files.mkdir(parents=True)
    (files / "media.json").write_text("{}")
    written = bundle.bundle(out, dest, str(files), limit=200_000)
    assert len(written) <= bundle.MAX_FILES and all(p.stat().st_size <= 200_000 for p in written)
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in written)  # flat, nothing else
    manifest = json.loads((dest / "bundle.json").read_text())
    assert any("s0_base.base.log" in cut for cut in manifest["logs.tar.gz"]["cut"])
    import tarfile

    with tarfile.open(dest / "metrics.tar.gz") as tar:
        names = tar.getnames()
    assert "runs/s0/eval_base/e2e/metrics.json" in names and not any("safetensors" in n for n in names)
    assert "runs/s0/eval_base/e2e/stage_a.jsonl" in names
    with tarfile.open(dest / "wandb_report.tar.gz") as tar:
        assert "wandb/offline-run-1/files/media.json" in tar.getnames()
