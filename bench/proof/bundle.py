"""The drift/cure report as at most 8 flat files of at most 16 MiB each, for a GPU call to write to ``$OUT``
(model folders never come back: they stay on the lent machine).

``python bench/drift_and_cure.py --device cuda --out outputs/drift --max-minutes 9 --bundle "$OUT"`` writes,
after every finished step (so a call that is cut off leaves what it had done) and after the call's report, each
file renamed into place whole:

- ``drift_and_cure.md``, ``drift_and_cure.json``, ``false_pass.png`` (the report, as written);
- ``logs.tar.gz``: ``logs/*.log`` (one per subprocess) and ``state.json``;
- ``metrics.tar.gz``: every run folder's small result files (``metrics.json``, the CSV logs,
  ``predictions.jsonl``, ``summary.json``, the end-to-end runs' own summaries ``stage_a.jsonl``), the fusion
  mixes and the distill file;
- ``wandb_report.tar.gz``: the offline W&B run of the results table and plot (``wandb sync`` it);
- ``bundle.json``: what each archive holds and what was cut to stay under the limit.

A file that would pass the limit is rebuilt with each member cut to its last part (logs) or left out
(the largest first), and ``bundle.json`` says so.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LIMIT = 16 * 1024 * 1024  # bytes per file that comes back
MAX_FILES = 8
REPORT_FILES = ("drift_and_cure.md", "drift_and_cure.json", "false_pass.png")
RESULT_NAMES = (
    "metrics.json",
    "metrics.csv",
    "predictions.jsonl",
    "summary.json",
    "manifest.json",
    "stage_a.jsonl",
)


def _members(out: Path, patterns: Iterable[str]) -> list[Path]:
    found = {p for pattern in patterns for p in out.glob(pattern) if p.is_file()}
    return sorted(found)


def _write_tar(dest: Path, out: Path, members: list[Path], cap: int | None) -> list[str]:
    """``members`` (relative to ``out``) into ``dest``; each cut to its last ``cap`` bytes when given."""
    cut = []
    with tarfile.open(dest, "w:gz") as tar:
        for path in members:
            name = str(path.relative_to(out))
            size = path.stat().st_size
            if cap is None or size <= cap:
                tar.add(path, arcname=name)
                continue
            with path.open("rb") as f:
                f.seek(size - cap)
                data = f.read()
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
            cut.append(f"{name}: last {cap} of {size} bytes")
    return cut


def pack(dest: Path, out: Path, members: list[Path], limit: int = LIMIT) -> dict[str, Any]:
    """A tar.gz of ``members`` under ``limit``: whole, then with members cut to their tails (1 MiB, then
    halving), then leaving the largest out."""
    members = list(members)
    left_out: list[str] = []
    cap: int | None = None
    while True:
        cut = _write_tar(dest, out, members, cap)
        if dest.stat().st_size <= limit:
            return {"members": len(members), "bytes": dest.stat().st_size, "cut": cut, "left_out": left_out}
        if cap is None or cap > 64 * 1024:
            cap = 1024 * 1024 if cap is None else cap // 2
        elif members:
            largest = max(members, key=lambda p: p.stat().st_size)
            members.remove(largest)
            left_out.append(str(largest.relative_to(out)))
        else:
            raise RuntimeError(f"{dest}: cannot get an empty archive under {limit} bytes")


@contextmanager
def _replaced(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write, renamed over ``path`` once written: a reader of the bundle (a copy
    taken while the call runs: it is rewritten after every finished step) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    yield tmp
    tmp.replace(path)


def bundle(out: Path, dest: Path, wandb_dir: str | Path | None, limit: int = LIMIT) -> list[Path]:
    """Write the bundle into ``dest`` (flat); returns its files (at most 8, each at most ``limit`` bytes)."""
    out = out.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {}
    files = []
    for name in REPORT_FILES:
        if (out / name).is_file() and (out / name).stat().st_size <= limit:
            with _replaced(dest / name) as tmp:
                shutil.copyfile(out / name, tmp)
            files.append(dest / name)
        elif (out / name).is_file():
            manifest[name] = {"left_out": f"{(out / name).stat().st_size} bytes, over the limit"}
    archives = {
        "logs.tar.gz": _members(out, ["logs/*.log", "state.json"]),
        "metrics.tar.gz": _members(
            out,
            [f"runs/**/{n}" for n in RESULT_NAMES]
            + ["fusion/*.yaml", "distill/distill_chatml.jsonl", "data/synthetic/manifest.json"],
        ),
    }
    if wandb_dir is not None and Path(wandb_dir).exists():
        run = Path(wandb_dir).resolve()
        run = run.parent if run.name == "files" else run  # wandb's run.dir is <run>/files
        archives["wandb_report.tar.gz"] = _members(out, [f"{run.relative_to(out.resolve())}/**/*"])
    for name, members in archives.items():
        if members:
            with _replaced(dest / name) as tmp:
                manifest[name] = pack(tmp, out, members, limit)
            files.append(dest / name)
    with _replaced(dest / "bundle.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    files.append(dest / "bundle.json")
    assert len(files) <= MAX_FILES and all(f.stat().st_size <= limit for f in files), files
    return files
