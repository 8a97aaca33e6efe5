"""The drift/cure plan as a DAG: its waves, the order in which ready steps start, and a simulation of the GPU
calls that run it (``python bench/drift_and_cure.py --device cuda --out outputs/drift --plan`` prints them).

Every :class:`proof.drift_plan.PlannedStep` names the steps whose outputs it reads (``after``); a step may
start once those are done. Estimates: a step's ``minutes`` are its wall time *alone* on one H200 (scaled from
the measured drift/cure run, ``proof/drift_profiles.py``). With ``n`` processes sharing the GPU each one runs :func:`slowdown`
``(n)`` times slower, an assumption (1.5x at 4), not a measurement. The scheduler (``proof/scheduler.py``)
and :func:`simulate` budget every step at ``slowdown(jobs)`` whatever runs beside it, so a call that runs
fewer processes than ``--jobs`` finishes earlier than planned, not later.

Memory: a step's ``memory_gb`` is its peak GPU memory alone (what ``nvidia-smi`` showed for its process: the
caching allocator's reserve, not the tensors' peak). With a GPU budget (``--gpu-memory-gb``, by default the card's
memory less :data:`GPU_RESERVE_GB`) a ready step starts only when its estimate fits beside those running
(:func:`fits`); a step that does not fit waits and a later-ranked one that does may start first. A step alone always
starts. Run 7's first call, without this rule, started two bases and the Teacher at once on an 80 GB H100: 48 +
48 + 26 GB, and the second base ran out of memory a minute in.

Start order (both here and in the scheduler): with ``--jobs 1`` the plan's order (each stage, then its
evaluation); with more, the step with the longest estimated chain of dependants first (the Teacher ->
distill -> cure A chain is the critical path), then the plan's order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

START_UP = 0.2  # minutes from the call's start to its first step (interpreter, imports, plan)
WRAP_UP = 0.5  # minutes after the last step: report, the W&B report run, the bundle
GPU_RESERVE_GB = 1.5  # of the card's memory, left to the main process and what the estimates miss


class Node(Protocol):
    name: str
    minutes: float
    after: list[str]
    memory_gb: float


def slowdown(n: int) -> float:
    """Assumed wall-time factor of each of ``n`` processes sharing one GPU: 1 + (n - 1) / 6 (1.5 at 4)."""
    return 1.0 + max(0, n - 1) / 6


def end_if_started(step: Node, now: float, factor: float, max_minutes: float) -> float | None:
    """The start rule shared by the scheduler and :func:`simulate`: the minute ``step`` would end if started
    ``now`` with every step ``factor`` times slower, or ``None`` when that passes ``max_minutes`` (0: no budget)."""
    end = now + step.minutes * factor
    return None if max_minutes and end > max_minutes else end


def fits(step: Node, in_use_gb: float, running: int, budget_gb: float) -> bool:
    """The memory rule shared by the scheduler and :func:`simulate`: ``step`` may start beside ``running`` steps
    that hold ``in_use_gb`` when no budget is set (0), nothing runs, or its estimate fits what is left."""
    return budget_gb <= 0 or running == 0 or in_use_gb + step.memory_gb <= budget_gb


def edges(steps: Iterable[Node]) -> set[tuple[str, str]]:
    """``(before, after)`` pairs: ``after`` reads what ``before`` wrote."""
    return {(dep, step.name) for step in steps for dep in step.after}


def with_dependants(steps: Iterable[Node], names: Iterable[str]) -> set[str]:
    """``names`` and every step that reads, directly or through others, what one of them wrote."""
    pairs, out, grew = edges(steps), set(names), True
    while grew:
        after = {b for a, b in pairs if a in out} - out
        out |= after
        grew = bool(after)
    return out


def chain_minutes(steps: Sequence[Node]) -> dict[str, float]:
    """Per step: its minutes plus the longest chain of dependants after it (the critical path from it)."""
    children: dict[str, list[str]] = {step.name: [] for step in steps}
    for before, after in edges(steps):
        if before in children:
            children[before].append(after)
    minutes = {step.name: step.minutes for step in steps}
    memo: dict[str, float] = {}

    def longest(name: str) -> float:
        if name not in memo:
            memo[name] = minutes[name] + max((longest(c) for c in children[name]), default=0.0)
        return memo[name]

    return {name: longest(name) for name in minutes}


def start_rank(steps: Sequence[Node], jobs: int) -> dict[str, tuple[float, int]]:
    """Sort key of ready steps: plan order with one job, else longest chain of dependants first."""
    chain = chain_minutes(steps)
    return {s.name: (0.0 if jobs <= 1 else -chain[s.name], i) for i, s in enumerate(steps)}


def waves(steps: Sequence[Node], done: Iterable[str] = ()) -> list[list[Node]]:
    """Steps left, by depth: wave k needs only steps done or in waves < k (wave 0 only done ones)."""
    done, by_name = set(done), {s.name: s for s in steps}
    depth: dict[str, int] = {}

    def level(name: str) -> int:
        if name not in depth:
            deps = [d for d in by_name[name].after if d in by_name and d not in done]
            depth[name] = 1 + max((level(d) for d in deps), default=-1)
        return depth[name]

    out: list[list[Node]] = []
    for step in steps:
        if step.name not in done:
            k = level(step.name)
            out += [[] for _ in range(k + 1 - len(out))]
            out[k].append(step)
    return out


@dataclass
class Call:
    """One simulated GPU call: ``(step, start, end)`` in minutes from the call's start."""

    runs: list[tuple[str, float, float]] = field(default_factory=list)

    @property
    def minutes(self) -> float:
        return max((end for _, _, end in self.runs), default=START_UP) + WRAP_UP


def simulate(
    steps: Sequence[Node],
    done: Iterable[str] = (),
    *,
    jobs: int,
    max_minutes: float,
    gpu_memory_gb: float = 0.0,
    calls: int = 20,
) -> list[Call]:
    """The calls of ``--jobs jobs --max-minutes max_minutes`` that finish what is left, as the scheduler runs
    them: a ready step starts when a slot is free, its estimate (``minutes * slowdown(jobs)``) fits the
    budget and its memory fits beside the running steps' (:func:`fits`). Raises ``ValueError`` when a step can
    never fit one call."""
    factor, finished = slowdown(jobs), set(done)
    rank = start_rank(steps, jobs)
    memory = {s.name: s.memory_gb for s in steps}
    left = [s for s in steps if s.name not in finished]
    out: list[Call] = []
    while left:
        if len(out) == calls:
            raise ValueError(f"more than {calls} calls needed")
        call, now, running, skipped = Call(), START_UP, [], set()
        while True:
            ready = sorted(
                (s for s in left if s.name not in skipped and all(d in finished for d in s.after)),
                key=lambda s: rank[s.name],
            )
            started = {name for name, _ in running}
            for step in (s for s in ready if s.name not in started):
                if len(running) >= jobs:
                    break
                if not fits(step, sum(memory[n] for n, _ in running), len(running), gpu_memory_gb):
                    continue
                end = end_if_started(step, now, factor, max_minutes)
                if end is None:
                    skipped.add(step.name)
                    continue
                running.append((step.name, end))
                call.runs.append((step.name, now, end))
            if not running:
                break
            now = min(end for _, end in running)
            for name, end in [r for r in running if r[1] == now]:
                running.remove((name, end))
                finished.add(name)
                left = [s for s in left if s.name != name]
        if not call.runs:
            raise ValueError(f"{', '.join(sorted(skipped))}: longer than --max-minutes {max_minutes}")
        out.append(call)
    return out


def describe(
    steps: Sequence[Node],
    done: Mapping[str, Any],
    *,
    jobs: int,
    max_minutes: float,
    command: str,
    gpu_memory_gb: float = 0.0,
) -> list[str]:
    """``--plan``'s text: the waves left with their estimates, then the calls and what each one finishes."""
    factor = slowdown(jobs)
    budget = f"{gpu_memory_gb:.0f} GB of GPU memory" if gpu_memory_gb > 0 else "no GPU memory budget"
    lines = [
        "",
        f"DAG waves left (minutes alone on one GPU, GB at peak; x{factor:.2f} assumed with --jobs {jobs}; {budget}):",
    ]
    for k, wave in enumerate(waves(steps, done)):
        lines.append(
            f"  wave {k}: " + ", ".join(f"{s.name} {s.minutes:.1f} ({s.memory_gb:.0f} GB)" for s in wave)
        )
    try:
        calls = simulate(steps, done, jobs=jobs, max_minutes=max_minutes, gpu_memory_gb=gpu_memory_gb)
    except ValueError as err:
        return [*lines, f"cannot split into calls: {err}"]
    total = sum(c.minutes for c in calls)
    lines += ["", f"{len(calls)} call(s), ~{total:.1f} min in all (each: the same command; it resumes):"]
    for i, call in enumerate(calls, 1):
        lines.append(f"  call {i} (~{call.minutes:.1f} min): {command}")
        for name, start, end in call.runs:
            lines.append(f"      {start:4.1f}-{end:4.1f}  {name}")
    return lines
