"""An on-disk cache whose values are JSON, so reading it back never runs code.

Why not diskcache: it stores values with pickle, and unpickling runs whatever the file says, so anyone who can write
the cache directory gets code run by every job that reads it. Here a value is JSON text in one sqlite table; a row
that is not valid JSON reads as a miss. sqlite also lets several processes of one machine share the file (WAL mode,
a busy timeout). A cache must never fail the job it serves: a database error is logged once and reads as a miss.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class JsonCache:
    """``get``/``set``/``delete`` of JSON values by string key in ``path`` (a sqlite file, created if missing)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one connection, used from whichever thread runs the event loop
        self._warned = False
        self._db: sqlite3.Connection | None = None  # opened on first use

    def _connect(self) -> sqlite3.Connection:
        """The open connection; after :meth:`close`, a new one (a closed cache is reopened by its next use)."""
        if self._db is None:
            db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer
            except sqlite3.Error:  # e.g. a network file system without shared memory: the default journal works
                pass
            db.execute("CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db = db
        return self._db

    def get(self, key: str) -> Any | None:
        try:
            with self._lock:
                row = self._connect().execute("SELECT value FROM cache WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as err:
            self._warn(err)
            return None
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except (TypeError, ValueError, RecursionError):
            return None

    def set(self, key: str, value: Any) -> None:
        text = json.dumps(value, ensure_ascii=False)
        try:
            with self._lock:
                self._connect().execute("INSERT OR REPLACE INTO cache (key, value) VALUES (?, ?)", (key, text))
        except sqlite3.Error as err:
            self._warn(err)

    def delete(self, key: str) -> None:
        try:
            with self._lock:
                self._connect().execute("DELETE FROM cache WHERE key = ?", (key,))
        except sqlite3.Error as err:
            self._warn(err)

    def __len__(self) -> int:
        with self._lock:
            return self._connect().execute("SELECT COUNT(*) FROM cache").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _warn(self, err: Exception) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("response cache %s unusable (%s); going on without it", self.path, err)
