"""JSONL input/output shared by every long job.

Why one module: all our jobs (corpus conversion, RAMP generation, CoT construction, eval) read line-oriented JSON
that may contain bad lines, and write append-only outputs that must survive a kill. Reading never crashes on a bad
line (it is counted with ``file:line`` and a reason); writing is resumable (a re-run skips finished keys) and a
half-written last line left by a kill is cut off on reopen, so nothing is lost or duplicated.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class BadLines:
    """Counts skipped input lines by reason and keeps the first few locations for the log/summary."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 20

    def add(self, path: str | os.PathLike, lineno: int, reason: str) -> None:
        self.counts[reason] += 1
        where = f"{path}:{lineno}: {reason}"
        if len(self.examples) < self.max_examples:
            self.examples.append(where)
        logger.warning("skipped %s", where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": list(self.examples)}


def iter_jsonl(
    path: str | os.PathLike, bad: BadLines | None = None, required: Iterable[str] = ()
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each good line; bad lines go to ``bad`` (or raise if it is None).

    A line is bad if it is not valid JSON, not an object, or lacks a ``required`` field.
    """
    required = tuple(required)
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                reason = f"invalid JSON ({err.msg} at column {err.colno})"
            else:
                if not isinstance(obj, dict):
                    reason = f"expected a JSON object, got {type(obj).__name__}"
                else:
                    missing = [key for key in required if key not in obj]
                    if not missing:
                        yield lineno, obj
                        continue
                    reason = f"missing field(s) {', '.join(repr(k) for k in missing)}"
            if bad is None:
                raise ValueError(f"{path}:{lineno}: {reason}")
            bad.add(path, lineno, reason)


def read_jsonl(path: str | os.PathLike, required: Iterable[str] = ()) -> list[dict]:
    """Read a whole JSONL file strictly: the first bad line raises ``ValueError`` naming file, line and field."""
    return [obj for _, obj in iter_jsonl(path, bad=None, required=required)]


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records atomically (temp file + rename): a kill leaves the old file or the new one, never half."""
    count = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
    return count


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Give a temporary sibling path to write to; on success it replaces ``path`` in one rename.

    Works for files and directories (an index directory is swapped whole).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)) / (target.name + suffix)
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            old = target.with_name(f".{target.name}.old.{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            _remove_tree(old)
        else:
            os.replace(tmp, target)
    finally:
        _remove_tree(tmp.parent)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class ResumableJsonlWriter:
    """Append-only JSONL output keyed by a field: the basis of every resumable job.

    On open it reads what is already there (cutting off a torn last line left by a kill), so ``done`` holds the
    finished keys; ``write`` refuses a key that is already done. Lines are flushed on every write and fsynced
    every ``sync_every`` writes and on close.
    """

    def __init__(self, path: str | os.PathLike, key: str = "id", sync_every: int = 256):
        self.path = Path(path)
        self.key = key
        self.sync_every = sync_every
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()
        self.repaired_bytes = self._load_and_repair()
        self._handle = open(self.path, "a", encoding="utf-8")
        self._unsynced = 0
        self.written = 0

    def _load_and_repair(self) -> int:
        if not self.path.exists():
            return 0
        good_end = 0
        with open(self.path, "rb") as handle:
            for raw in handle:
                if not raw.endswith(b"\n"):
                    break  # torn tail from a kill mid-write
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError:
                    break
                good_end += len(raw)
                if isinstance(obj, dict) and self.key in obj:
                    self.done.add(str(obj[self.key]))
        size = self.path.stat().st_size
        if size > good_end:
            logger.warning("%s: cut %d bytes of a torn last record (left by an interrupted run)", self.path, size - good_end)
            with open(self.path, "r+b") as handle:
                handle.truncate(good_end)
        return size - good_end

    def write(self, record: dict) -> bool:
        """Append ``record``; returns False (and writes nothing) if its key is already done."""
        key = str(record[self.key])
        if key in self.done:
            return False
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        self.done.add(key)
        self.written += 1
        self._unsynced += 1
        if self._unsynced >= self.sync_every:
            os.fsync(self._handle.fileno())
            self._unsynced = 0
        return True

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()

    def __enter__(self) -> ResumableJsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
