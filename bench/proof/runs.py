"""Running the project's entry points as the proof scripts' steps: one subprocess per step, logged.

A :class:`Step` is one command line (``python -m bbuqc_lightning.train ...`` or a ``tools/`` script) with
the run folder it writes; :func:`run_step` runs it offline (W&B offline, no hub access) with its output in
``logs/<name>.log`` and exits with the log's tail when it fails.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bbuqc_lightning.constants import GPU_RESERVED_KEY

REPO = Path(__file__).resolve().parents[2]
_ACTIVE: set[subprocess.Popen] = set()  # subprocesses running now (steps may run in several threads)
_LOCK = threading.Lock()


@dataclass
class Step:
    """One subprocess of the pipeline and what it left behind."""

    name: str
    argv: list[str]
    run_dir: Path | None = None
    seconds: float = 0.0
    wandb_runs: list[str] = field(default_factory=list)
    gpu_reserved_gb: float | None = None  # the run's metrics.json: its process's peak reserve (None: no GPU)

    @property
    def command(self) -> str:
        """The command as typed in the folder the script runs from (``python``: this interpreter)."""
        return shlex.join(["python", *self.argv[1:]])

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "command": self.command,
            "run_dir": None if self.run_dir is None else str(self.run_dir),
            "wandb_runs": self.wandb_runs,
            "seconds": round(self.seconds, 1),
            "gpu_reserved_gb": None if self.gpu_reserved_gb is None else round(self.gpu_reserved_gb, 2),
        }


def trainer_overrides(device: str, precision: str | None) -> list[str]:
    """CPU: the default trainer (fp32). CUDA: ``trainer=gpu`` (bf16-mixed) unless ``precision`` is given."""
    if device == "cpu":
        return ["trainer=default"]
    return ["trainer=gpu", *([f"trainer.precision={precision}"] if precision else [])]


def max_time(minutes: float) -> list[str]:
    """Lightning's ``max_time`` ("DD:HH:MM:SS"): training stops there even before ``max_steps``."""
    if minutes <= 0:
        return []
    seconds = round(minutes * 60)
    return [f"++trainer.max_time=00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"]


def run_step(step: Step, logs: Path) -> None:
    """Run ``step`` (from the current folder), its output in ``logs/<name>.log``; exit on failure (in a
    worker thread the ``SystemExit`` is that step's error, see ``proof/scheduler.py``)."""
    log_path = logs / f"{step.name}.log"
    if log_path.exists():  # an earlier attempt's (a retry, or a call cut off): kept beside the new one
        log_path.replace(log_path.with_suffix(".previous.log"))
    print(f"[{time.strftime('%H:%M:%S')}] {step.name}: {step.command}", flush=True)
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # tools/*.py import the package: from a checkout that is not pip-installed (a lent GPU machine), its root
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }
    start = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(step.argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        with _LOCK:
            _ACTIVE.add(process)
        try:
            code = process.wait()
        finally:
            with _LOCK:
                _ACTIVE.discard(process)
    step.seconds = time.perf_counter() - start
    step.gpu_reserved_gb = _gpu_reserved(step.run_dir)
    if code != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        peak = (
            ""
            if step.gpu_reserved_gb is None
            else f"; GPU memory reserved at peak {step.gpu_reserved_gb:.1f} GiB"
        )
        sys.exit(f"error: step {step.name} failed (exit {code}{peak}); log {log_path}:\n" + "\n".join(tail))
    if step.run_dir is not None:
        step.wandb_runs = sorted(str(p) for p in step.run_dir.glob("wandb/offline-run-*"))
    print(f"  done in {step.seconds:.0f} s", flush=True)


def _gpu_reserved(run_dir: Path | None) -> float | None:
    """The peak GPU reserve the run's process wrote into its metrics.json (``train`` writes it after a failure
    too: an out-of-memory step says how far it got), or None."""
    metrics = None if run_dir is None else run_dir / "metrics.json"
    if metrics is None or not metrics.is_file():
        return None
    try:
        return json.loads(metrics.read_text(encoding="utf-8")).get(GPU_RESERVED_KEY)
    except (OSError, ValueError):  # a process killed mid-write leaves a partial file: no figure, no crash
        return None


def stop_all(grace: float = 10.0) -> None:
    """Terminate every running step subprocess (SIGTERM, then SIGKILL after ``grace`` seconds)."""
    with _LOCK:
        processes = list(_ACTIVE)
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def device_name(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)" if device == "cpu" else "cuda (not visible to this process)"


def gpu_memory_gb(device: str) -> float | None:
    """Total memory (GiB) of the card the steps share, or ``None`` when this process sees no GPU."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return None


def gpu_budget(requested: float | None, device: str, *, planning: bool) -> float:
    """GiB the running steps may hold together: ``requested`` (``--gpu-memory-gb``; 0: no budget), else the visible
    card's total less ``GPU_RESERVE_GB``; planning on a machine without the GPU assumes an 80 GB H100; 0 on cpu."""
    from proof.dag import GPU_RESERVE_GB
    from proof.drift_profiles import PLAN_GPU_MEMORY_GB

    if requested is not None:
        if requested < 0:
            sys.exit("error: --gpu-memory-gb must be 0 (no budget) or more")
        return requested
    if device == "cpu":
        return 0.0
    total = gpu_memory_gb(device)
    if total is None:
        if not planning:
            print("warning: no GPU visible to this process: steps start without a GPU memory budget")
            return 0.0
        total = PLAN_GPU_MEMORY_GB
    return max(0.0, total - GPU_RESERVE_GB)
