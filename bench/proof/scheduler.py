"""Run a DAG of steps concurrently, each step's subprocesses in a worker thread, on one GPU.

``run_dag`` starts a step once every step it reads (``after``) is done, at most ``jobs`` at a time, in the
order of :func:`proof.dag.start_rank`, and not at all when its estimate (``minutes * slowdown(jobs)``) would
end past ``max_minutes`` of wall time (it and its dependants are then *left* for the next call); with a
``gpu_memory_gb`` budget, a ready step waits until its memory estimate fits beside the running steps'
(:func:`proof.dag.fits`) while later-ranked steps that fit start. A step that runs out of GPU memory while other
steps ran beside it (its log says ``CUDA out of memory``: the estimates are from one profile, and a ``--set`` can
move them) is run once more, alone: no other step starts until it has. Only the
calling (main) thread sees results: ``on_finish(name, record)`` runs there, one step at a time, so the one
writer of ``state.json`` is the main process. A step that raises (a failed subprocess exits with
``SystemExit``) is *failed*: its dependants are *blocked*, every other branch goes on. An interrupt
(Ctrl-C, SIGTERM turned into ``KeyboardInterrupt`` by the caller) stops the running subprocesses and
propagates; steps already recorded stay done, the others rerun from scratch on the next call.

``bench/drift_and_cure.py --jobs N --max-minutes M`` drives it; the tests drive it with ``python -c`` steps.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from proof.dag import Node, end_if_started, fits, slowdown, start_rank
from proof.runs import stop_all


@dataclass
class Outcome:
    """What one call did with the steps it was asked to run."""

    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # name -> error (the log's tail)
    blocked: dict[str, str] = field(default_factory=dict)  # name -> why it cannot start
    left: list[str] = field(default_factory=list)  # over the budget (or after such a step): next call

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked


# what a step's log tail says when the GPU ran out of memory: the caching allocator's error, and those of
# allocations outside it (the CUDA runtime, cuBLAS workspaces)
OUT_OF_MEMORY = (
    "CUDA out of memory",
    "OutOfMemoryError",
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
)


def _message(exc: BaseException) -> str:
    """A failed subprocess's message (its log's tail), or the traceback of an error in this process."""
    if isinstance(exc, SystemExit):
        return str(exc.code)
    return "".join(traceback.format_exception(exc)).rstrip()


def run_dag(
    steps: Sequence[Node],
    wanted: Collection[str],
    done: Mapping[str, Any],
    *,
    jobs: int,
    execute: Callable[[Any], dict[str, Any]],
    on_finish: Callable[[str, dict[str, Any]], None],
    max_minutes: float = 0.0,
    gpu_memory_gb: float = 0.0,
    elapsed: Callable[[], float] | None = None,
    log: Callable[[str], None] = print,
) -> Outcome:
    """Run the ``wanted`` steps of ``steps`` (a step in ``done`` and not wanted counts as finished).

    ``execute(step)`` runs in a worker thread and returns what the state records; ``elapsed()`` gives the
    call's minutes so far (default: since this function started)."""
    if jobs < 1:
        raise ValueError("jobs must be at least 1")
    if elapsed is None:
        t0 = time.monotonic()
        elapsed = lambda: (time.monotonic() - t0) / 60  # noqa: E731
    factor, rank = slowdown(jobs), start_rank(steps, jobs)
    by_name = {s.name: s for s in steps}
    pending = sorted((n for n in by_name if n in set(wanted)), key=rank.__getitem__)
    ok = set(done) - set(pending)
    out, running = Outcome(), {}  # type: ignore[var-annotated]
    windows: dict[str, tuple[float, float]] = {}
    waited: set[str] = set()  # steps whose wait for memory was logged
    beside: dict[str, set[str]] = {}  # step -> the steps that ran at some time beside it
    alone: set[str] = set()  # steps run again alone after running out of memory beside others

    def settle() -> None:
        """Move pending steps that cannot start this call to blocked / left (to a fixed point)."""
        moved = True
        while moved:
            moved = False
            for name in list(pending):
                deps = by_name[name].after
                bad = [d for d in deps if d in out.failed or d in out.blocked]
                later = [d for d in deps if d in out.left]
                absent = [d for d in deps if d not in ok and d not in pending and d not in running.values()]
                absent = [d for d in absent if d not in bad and d not in later]
                if bad or absent:
                    why = f"{', '.join(bad)} failed or blocked" if bad else ""
                    why = why or f"needs {', '.join(absent)}: neither done nor selected"
                    out.blocked[name] = why
                elif later:
                    out.left.append(name)
                else:
                    continue
                pending.remove(name)
                moved = True

    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="step") as pool:
        try:
            while True:
                settle()
                ready = [n for n in pending if all(d in ok for d in by_name[n].after)]
                solo = [n for n in ready if n in alone]
                if solo or any(n in alone for n in running.values()):
                    ready = solo[:1] if not running else []  # drain, then the retry alone
                for name in ready:
                    if len(running) >= jobs:
                        break
                    in_use = sum(by_name[n].memory_gb for n in running.values())
                    if not fits(by_name[name], in_use, len(running), gpu_memory_gb):
                        if name not in waited:
                            waited.add(name)
                            log(
                                f"[{time.strftime('%H:%M:%S')}] {name} waits for GPU memory: ~{by_name[name].memory_gb:.0f} "
                                f"GB beside ~{in_use:.0f} GB running, budget {gpu_memory_gb:.0f} GB"
                            )
                        continue
                    now = elapsed()
                    estimate = by_name[name].minutes * factor
                    pending.remove(name)
                    if end_if_started(by_name[name], now, factor, max_minutes) is None:
                        log(
                            f"not starting {name}: ~{estimate:.1f} min would pass --max-minutes {max_minutes:g}"
                        )
                        out.left.append(name)
                        continue
                    log(
                        f"[{time.strftime('%H:%M:%S')}] start {name} (~{estimate:.1f} min, {len(running) + 1} running)"
                    )
                    windows[name] = (now, now)
                    beside[name] = set(running.values())
                    for other in running.values():
                        beside[other].add(name)
                    future: Future = pool.submit(execute, by_name[name])
                    running[future] = name
                settle()
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in sorted(finished, key=lambda f: rank[running[f]]):
                    name = running.pop(future)
                    windows[name] = (windows[name][0], elapsed())
                    error = future.exception()
                    if error is not None:
                        message = _message(error)
                        if any(m in message for m in OUT_OF_MEMORY) and beside[name] and name not in alone:
                            alone.add(name)
                            pending.append(name)
                            pending.sort(key=rank.__getitem__)
                            log(
                                f"[{time.strftime('%H:%M:%S')}] {name} ran out of GPU memory beside "
                                f"{', '.join(sorted(beside[name]))}: it runs again alone once those end"
                            )
                            continue
                        out.failed[name] = message
                        log(f"[{time.strftime('%H:%M:%S')}] FAILED {name}: its dependants will not start")
                        continue
                    record = dict(future.result())
                    record["window_minutes"] = [round(t, 2) for t in windows[name]]
                    if name in alone:
                        record["retried_alone"] = True  # after running out of GPU memory beside other steps
                    ok.add(name)
                    out.finished.append(name)
                    on_finish(name, record)
        except BaseException:
            stop_all()  # the running subprocesses; their threads then return
            raise
    return out
