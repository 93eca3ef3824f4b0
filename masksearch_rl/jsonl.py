"""JSONL input/output shared by every long job.

Why one module: all our jobs (corpus conversion, RAMP generation, CoT construction, eval) read line-oriented JSON
that may contain bad lines, and write append-only outputs that must survive a kill. Reading never crashes on a bad
line (it is counted with ``file:line`` and a reason); writing is resumable (a re-run skips finished keys) and a
half-written last line left by a kill is cut off on reopen, so nothing is lost or duplicated. A bad line anywhere
else in an output is not something a kill leaves behind, so reopening refuses it (naming ``file:line``) rather than
cutting away the records after it.

Input bytes are never lost silently (:func:`iter_lines`, under every reader): files are read as bytes and decoded
line by line, so a line that is not UTF-8 is skipped alone, counted with its true line number, and the lines after
it are read (text-mode decoding fails a whole read-ahead buffer at once, hiding the line and everything after it).
A UTF-8 byte-order mark is dropped. A ``.gz``/``.bz2`` file that ends early or is corrupt raises
:class:`InputError` naming the file and the last line read: its partial content must not pass for the whole.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import json
import logging
import os
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)


@dataclass
class BadLines:
    """Counts skipped input lines by reason and keeps the first few locations for the log/summary."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 20
    log: bool = True  # False for look-ahead reads (format detection) whose lines are read again for real

    def add(self, path: str | os.PathLike, lineno: int, reason: str) -> None:
        self.counts[reason] += 1
        where = f"{path}:{lineno}: {reason}"
        if len(self.examples) < self.max_examples:
            self.examples.append(where)
        if self.log:
            logger.warning("skipped %s", where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": list(self.examples)}


class InputError(ValueError):
    """An input file that cannot be read to its end (a truncated or corrupt ``.gz``/``.bz2``): the command stops and
    names it, since what was read so far would otherwise pass for the whole file."""


def open_binary(path: str | os.PathLike) -> IO[bytes]:
    """The file's bytes, decompressed when its name ends in ``.gz`` or ``.bz2``."""
    name = os.fspath(path)
    if name.endswith(".gz"):
        return gzip.open(name, "rb")
    if name.endswith(".bz2"):
        return bz2.open(name, "rb")
    return open(name, "rb")


def iter_lines(path: str | os.PathLike, bad: BadLines | None = None) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for each line of a text file, decoded on its own.

    A line that is not UTF-8 goes to ``bad`` with its line number (or raises ``ValueError`` when ``bad`` is None)
    and the next line is read; a UTF-8 byte-order mark before the first line is dropped; a compressed file that
    ends early or is corrupt raises :class:`InputError`. Lines keep their line break characters.
    """
    lineno = 0
    handle = open_binary(path)
    try:
        with handle:
            for lineno, raw in enumerate(handle, start=1):
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8) :]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    reason = f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                    if bad is None:
                        raise ValueError(f"{path}:{lineno}: {reason}") from None
                    bad.add(path, lineno, reason)
                    continue
                yield lineno, text
    except (EOFError, OSError, zlib.error) as err:
        raise InputError(
            f"{path}: cannot be read past line {lineno} ({type(err).__name__}: {err}); a truncated or corrupt "
            "compressed file? Nothing after that line was read."
        ) from err


def parse_json_object(line: str, required: tuple[str, ...] = ()) -> dict | str:
    """The line's JSON object, or why it is not a usable record (invalid JSON, not an object, a missing field)."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as err:
        if isinstance(err, RecursionError):
            return "invalid JSON (nested too deeply)"
        return f"invalid JSON ({err.msg} at column {err.colno})"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    missing = [key for key in required if key not in obj]
    if missing:
        return f"missing field(s) {', '.join(repr(k) for k in missing)}"
    return obj


def iter_jsonl(
    path: str | os.PathLike, bad: BadLines | None = None, required: Iterable[str] = ()
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each good line; bad lines go to ``bad`` (or raise if it is None).

    A line is bad if it is not UTF-8, not valid JSON, not an object, or lacks a ``required`` field. ``.gz`` and
    ``.bz2`` files are decompressed; one that is truncated raises :class:`InputError` (see :func:`iter_lines`).
    """
    required = tuple(required)
    for lineno, line in iter_lines(path, bad):
        if not line.strip():
            continue
        obj = parse_json_object(line, required)
        if isinstance(obj, dict):
            yield lineno, obj
            continue
        if bad is None:
            raise ValueError(f"{path}:{lineno}: {obj}")
        bad.add(path, lineno, obj)


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


class CorruptOutputError(ValueError):
    """An output file with a bad line before its end: not a torn write, so it is left as it is for a person to fix."""


class ResumableJsonlWriter:
    """Append-only JSONL output keyed by a field: the basis of every resumable job.

    On open it reads what is already there, so ``done`` holds the finished keys; ``write`` refuses a key that is
    already done. Lines are flushed on every write and fsynced every ``sync_every`` writes and on close.

    Repair is limited to what a kill can leave: the text after the last newline (a record is written as one
    ``json + "\\n"``, so a torn write never ends in a newline). That tail is cut when it does not parse, and completed
    with its newline when it does. A line that does not parse *before* the tail raises :class:`CorruptOutputError`
    naming ``file:line`` and the file is not touched: cutting there would silently drop every record after it.
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
        """Fill ``done`` from the file; returns how many bytes of a torn last line were cut (0 if none)."""
        if not self.path.exists():
            return 0
        keys: list[str] = []
        good_end = 0
        tail = b""
        with open(self.path, "rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                if not raw.endswith(b"\n"):
                    tail = raw  # only the last line can lack its newline
                    break
                if raw.strip():
                    obj = _parse_line(raw)
                    if obj is _UNPARSEABLE:
                        raise CorruptOutputError(
                            f"{self.path}:{lineno}: unparseable line before the end of the file (not a torn last "
                            f"write, so nothing was cut): {raw[:120]!r}. Fix or remove that line and run again."
                        )
                    if isinstance(obj, dict) and self.key in obj:
                        keys.append(str(obj[self.key]))
                good_end += len(raw)
        self.done.update(keys)
        if not tail:
            return 0
        obj = _parse_line(tail)
        if obj is not _UNPARSEABLE:  # a complete record that only lacks its newline: keep it
            if isinstance(obj, dict) and self.key in obj:
                self.done.add(str(obj[self.key]))
            with open(self.path, "ab") as handle:
                handle.write(b"\n")
            return 0
        logger.warning("%s: cut %d bytes of a torn last record (left by an interrupted run)", self.path, len(tail))
        with open(self.path, "r+b") as handle:
            handle.truncate(good_end)
        return len(tail)

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


class ErrorLog:
    """``<out>.errors.jsonl`` of a resumable job: the tasks that failed (so were not written to the output and are
    retried by the next run), one line per failed attempt with its cause.

    Why pruned: the file should answer "what is still failing?". ``done`` is the output writer's live set of finished
    keys; on close, lines whose key is in it (a later attempt succeeded) are dropped, atomically. Lines that do not
    parse are kept as they are.
    """

    def __init__(self, path: str | os.PathLike, done: set[str], key: str = "id"):
        self.path = Path(path)
        self.key = key
        self.done = done
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")
        self.pending = 0

    def add(self, key: str, kind: str, error: str, traceback: str | None = None) -> None:
        """One failed attempt: ``kind`` says what failed (``backend``: an endpoint or search; ``task_error``: a bug)."""
        entry = {self.key: key, "kind": kind, "error": error}
        if traceback:
            entry["traceback"] = traceback
        self._handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> int:
        """Close and prune; returns how many distinct keys are still failing."""
        if not self._handle.closed:
            self._handle.close()
        if not self.path.exists():
            return 0
        kept, failing = [], set()
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                obj = _parse_line(line)
                key = str(obj.get(self.key)) if isinstance(obj, dict) and self.key in obj else None
                if key is not None and key in self.done:
                    continue
                kept.append(line if line.endswith("\n") else line + "\n")
                if key is not None:
                    failing.add(key)
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(kept), encoding="utf-8")
        self.pending = len(failing)
        return self.pending

    def __enter__(self) -> ErrorLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_UNPARSEABLE = object()


def _parse_line(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _UNPARSEABLE
