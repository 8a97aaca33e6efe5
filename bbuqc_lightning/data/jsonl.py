"""Crash-safe JSONL primitives shared by Stage-A and later artifacts.

Two ways to write, for two kinds of file:

- **streamed** files (Stage-A output, trajectories): :class:`JsonlAppender` appends one JSON object per
  line (UTF-8, ``ensure_ascii=False``), each as a single ``write`` of ``line + "\\n"`` followed by
  ``flush`` and, by default, ``os.fsync``. A ``kill -9`` can therefore only leave a *torn tail*: bytes
  after the last ``\\n``. Every line that ends in ``\\n`` is complete and valid.
- **whole** files rewritten at once (distillation export, guidance): :func:`atomic_write_jsonl` writes a
  temporary file in the same folder, fsyncs it and ``os.replace`` s it over the target, so a reader sees
  the old file or the new one, never a mix.

Repair policy (decided here, once): only the tail can be torn, because nothing appends to a file before
:func:`repair_jsonl` has cut its torn tail (the appender does it on open). So repair *truncates the bytes
after the last newline* and nothing else. A complete line that does not parse is not something our
writers can produce (it means disk corruption or a foreign writer); readers raise :class:`JsonlError`
naming ``path:line`` instead of silently dropping it. Readers ignore (and log) a torn tail, so a file
that another process is still appending to can be read safely.

>>> with JsonlAppender("out.jsonl") as out:  # doctest: +SKIP
...     out.append({"ticket_key": "QC-A-20250101-1::pass", "per_image": {"图片_1": "无关图片"}})
>>> read_jsonl_keys("out.jsonl", "ticket_key")  # doctest: +SKIP
{'QC-A-20250101-1::pass'}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)

_CHUNK = 1 << 16


class JsonlError(ValueError):
    """A complete line of a JSONL file that is not a JSON object (message: ``path:line``)."""


def dumps_line(row: Mapping[str, Any]) -> bytes:
    """One JSON object as UTF-8 bytes ending in ``\\n`` (``json`` escapes newlines inside strings).

    >>> dumps_line({"a": 1})
    b'{"a": 1}\\n'
    """
    return (json.dumps(dict(row), ensure_ascii=False) + "\n").encode("utf-8")


def complete_size(path: str | Path) -> int:
    """Byte length of the complete lines of ``path`` (up to and including the last ``\\n``)."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - _CHUNK)
            f.seek(start)
            chunk = f.read(pos - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            pos = start
        return 0


def repair_jsonl(path: str | Path) -> int:
    """Truncate a torn tail (bytes after the last ``\\n``); return the number of bytes removed.

    A missing file is fine (0). Call it before appending to a file a killed process may have written.
    """
    path = Path(path)
    if not path.exists():
        return 0
    size = path.stat().st_size
    keep = complete_size(path)
    if keep == size:
        return 0
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    log.warning("%s: removed a torn last line (%d bytes) left by an interrupted writer", path, size - keep)
    return size - keep


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """The objects of the complete lines of ``path`` (blank lines skipped, torn tail ignored).

    Raises :class:`JsonlError` naming ``path:line`` for a complete line that is not a JSON object.
    """
    path = Path(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                log.warning("%s:%d: ignoring a torn last line (%d bytes)", path, number, len(raw))
                return
            if not raw.strip():
                continue
            yield parse_line(path, number, raw)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All objects of :func:`iter_jsonl`; a missing file reads as empty."""
    return list(iter_jsonl(path)) if Path(path).exists() else []


def read_jsonl_keys(path: str | Path, key: str) -> set[Any]:
    """The values of ``key`` over the complete lines of ``path`` (missing file: empty set).

    Raises :class:`JsonlError` for a line without ``key`` (the file is not what the caller thinks).
    """
    path = Path(path)
    if not path.exists():
        return set()
    keys = set()
    for number, row in enumerate(iter_jsonl(path), start=1):
        if key not in row:
            raise JsonlError(f"{path}: object #{number} has no {key!r} field")
        keys.add(row[key])
    return keys


class OpenCloseContext:
    """``with writer:`` opens it on entry and closes it on exit, for writers with ``open()`` / ``close()``."""

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class JsonlAppender(OpenCloseContext):
    """Context manager that appends one object per line, durable line by line.

    On open it creates the parent folder and repairs a torn tail (see module docstring); each
    :meth:`append` is one ``write`` + ``flush`` (+ ``os.fsync`` when ``fsync``), so a line is either
    entirely on disk or (if the process is killed mid-write) a torn tail that the next open removes.
    """

    def __init__(self, path: str | Path, fsync: bool = True, repair: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.repair = repair
        self.lines_written = 0
        self._file: Any = None

    def open(self) -> None:
        """Create the folder, repair the tail, open for appending (idempotent)."""
        if self._file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.repair:
            repair_jsonl(self.path)
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed by close()

    def append(self, row: Mapping[str, Any]) -> None:
        """Write ``row`` as one line and make it durable before returning."""
        if self._file is None:
            raise RuntimeError(f"JsonlAppender({self.path}) is not open")
        data = dumps_line(row)
        view = memoryview(data)
        while view:  # unbuffered write may be partial (signals, pipes): loop until all bytes are out
            written = self._file.write(view)
            view = view[written:]
        if self.fsync:
            os.fsync(self._file.fileno())
        self.lines_written += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def atomic_write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]], fsync: bool = True) -> int:
    """Replace ``path`` with ``rows`` atomically; returns the number of rows written (see :func:`atomic_write`)."""
    return atomic_write(path, (dumps_line(row) for row in rows), fsync=fsync)


def atomic_write(path: str | Path, chunks: Iterable[bytes], fsync: bool = True) -> int:
    """Replace ``path`` with the concatenated ``chunks`` atomically (temp file in the same folder + ``os.replace``).

    A crash at any moment leaves the old file untouched (and at worst a stray ``.<name>.*.tmp`` file
    next to it, which readers never open). Returns the number of chunks written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                count += 1
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    if fsync:
        _fsync_dir(path.parent)
    return count


def parse_line(path: Path, number: int, raw: bytes) -> dict[str, Any]:
    """One JSONL line as a dict; a :class:`JsonlError` naming ``path:number`` otherwise."""
    try:
        row = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise JsonlError(f"{path}:{number}: not valid JSON ({err})") from err
    if not isinstance(row, dict):
        raise JsonlError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
    return row


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
