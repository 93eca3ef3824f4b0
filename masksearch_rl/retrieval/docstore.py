"""Passage storage for an index directory: a JSONL file plus a NumPy array of line offsets, memory-mapped.

Why: an index returns row numbers; the server must turn them into ``{"id", "contents"}`` for millions of passages
without holding them all in RAM. Reading a line at a known byte offset from a memory-mapped file costs microseconds
and lets the OS page cache decide what stays resident.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

DOCS_FILE = "docs.jsonl"
OFFSETS_FILE = "doc_offsets.npy"


def write_docstore(directory: str | os.PathLike, passages: Iterable[dict]) -> int:
    """Write ``docs.jsonl`` (one ``{"id","contents"}`` per line, row order = index order) and its offsets.

    Returns the number of passages. The caller makes the directory atomic (see ``masksearch_rl.jsonl.atomic_path``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    offsets: list[int] = []
    position = 0
    with open(directory / DOCS_FILE, "wb") as handle:
        for passage in passages:
            line = json.dumps({"id": str(passage["id"]), "contents": passage["contents"]}, ensure_ascii=False)
            raw = line.encode("utf-8") + b"\n"
            offsets.append(position)
            handle.write(raw)
            position += len(raw)
    offsets.append(position)  # end sentinel: row i spans offsets[i]:offsets[i+1]
    np.save(directory / OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))
    return len(offsets) - 1


class DocStore:
    """Random access to the passages of an index directory by row number."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        self.path = directory / DOCS_FILE
        self.offsets = np.load(directory / OFFSETS_FILE, mmap_mode="r")
        self._file = open(self.path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, row: int) -> dict:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {self.path} ({len(self)} passages)")
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        return json.loads(self._map[start:end])

    def get_many(self, rows: Iterable[int]) -> list[dict]:
        return [self.get(int(row)) for row in rows]

    def __iter__(self) -> Iterator[dict]:
        for row in range(len(self)):
            yield self.get(row)

    def close(self) -> None:
        if isinstance(self._map, mmap.mmap):
            self._map.close()
        self._file.close()
