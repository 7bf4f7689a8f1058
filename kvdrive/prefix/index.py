"""The persistent index of the prefix pool: which chunk lives in which disk slots.

One SQLite database in WAL mode with ``synchronous=FULL``: every change is one
transaction, durable when the call returns, and a crash leaves either the old or the
new state. The pool keeps the write order that makes this crash-safe: chunk data is
written and ``fdatasync``-ed before its row is inserted, and a row is deleted before
its slots are freed. So a row always names complete data; data without a row is free
space. Checksums (xxh3_64 per slot) are stored with the row, and every read is
checked against them.

Tables: ``meta`` (the slot geometry the pool was created with), ``chunks`` (key ->
path, slots, checksums, LRU clock), ``seen`` (key -> how often a store met it, for
admission; pruned to ``seen_capacity`` rows). Used from one thread (the engine's).

SQLite errors are told apart by cause (``index_error``): a damaged file is the only one
whose fix is to move the index away; a full file system or a read-only directory is
fixed there, and moving the index away would throw a good cache away.
"""

from __future__ import annotations

import os
import sqlite3
from typing import NamedTuple

import numpy as np

from kvdrive.errors import KvdriveError

_SQL_VARS = 900  # keys per IN (...) query; SQLite's old default limit is 999 variables
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (key BLOB PRIMARY KEY, path TEXT NOT NULL, slots BLOB NOT NULL,
                                   sums BLOB NOT NULL, last_used INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_lru ON chunks (last_used);
CREATE TABLE IF NOT EXISTS seen (key BLOB PRIMARY KEY, count INTEGER NOT NULL, last_seen INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS seen_lru ON seen (last_seen);
"""


class DiskChunk(NamedTuple):
    """One chunk on disk: its path and one slot (with checksum) per layer."""

    key: bytes
    path: str
    slots: list[int]
    sums: list[int]


class PrefixIndex:
    def __init__(self, file: str, geometry: str, seen_capacity: int):
        self.file = file
        self.seen_capacity = seen_capacity
        self._db = None
        try:
            self._db = sqlite3.connect(file)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            with self._db:
                self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT v FROM meta WHERE k = 'geometry'").fetchone()
            if row is None:
                with self._db:
                    self._db.execute("INSERT INTO meta VALUES ('geometry', ?)", (geometry,))
            self._clock = self._db.execute("SELECT COALESCE(MAX(last_used), 0) FROM chunks").fetchone()[0]
        except sqlite3.DatabaseError as err:
            self.close()
            raise index_error(file, err) from None
        if row is not None and row[0] != geometry:
            self.close()
            raise _other_geometry(file, row[0], geometry)

    @staticmethod
    def check_geometry(file: str, geometry: str) -> None:
        """Refuse an existing index of another geometry, reading it only (before the pool
        touches its extents). An absent or unreadable index is left to the constructor."""
        if not os.path.exists(file):
            return
        try:
            db = sqlite3.connect(f"file:{file}?immutable=1", uri=True)  # no -wal/-shm files made
            try:
                row = db.execute("SELECT v FROM meta WHERE k = 'geometry'").fetchone()
            finally:
                db.close()
        except sqlite3.DatabaseError:
            return
        if row is not None and row[0] != geometry:
            raise _other_geometry(file, row[0], geometry)

    def tick(self) -> int:
        self._clock += 1
        return self._clock

    def all(self) -> list[DiskChunk]:
        return [_chunk(r) for r in self._db.execute("SELECT key, path, slots, sums FROM chunks")]

    def get(self, keys: list[bytes]) -> dict[bytes, DiskChunk]:
        out: dict[bytes, DiskChunk] = {}
        for i in range(0, len(keys), _SQL_VARS):
            part = keys[i : i + _SQL_VARS]
            q = f"SELECT key, path, slots, sums FROM chunks WHERE key IN ({','.join('?' * len(part))})"
            out.update((r[0], _chunk(r)) for r in self._db.execute(q, part))
        return out

    def insert(self, chunks: list[DiskChunk]) -> None:
        t = self.tick()
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?)",
                [(c.key, c.path, _blob(c.slots, np.int64), _blob(c.sums, np.uint64), t) for c in chunks],
            )

    def remove(self, keys: list[bytes]) -> None:
        with self._db:
            self._db.executemany("DELETE FROM chunks WHERE key = ?", [(k,) for k in keys])

    def touch(self, keys: list[bytes]) -> None:
        t = self.tick()
        with self._db:
            self._db.executemany("UPDATE chunks SET last_used = ? WHERE key = ?", [(t, k) for k in keys])

    def lru(self, path: str, limit: int) -> list[DiskChunk]:
        """Up to ``limit`` chunks on ``path``, least recently used first."""
        rows = self._db.execute(
            "SELECT key, path, slots, sums FROM chunks WHERE path = ? ORDER BY last_used LIMIT ?", (path, limit)
        )
        return [_chunk(r) for r in rows]

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def seen(self, keys: list[bytes]) -> list[int]:
        """Count one more sighting of each key; returns the new counts."""
        t = self.tick()
        with self._db:
            self._db.executemany(
                "INSERT INTO seen VALUES (?, 1, ?) ON CONFLICT(key) DO UPDATE SET "
                "count = count + 1, last_seen = excluded.last_seen",
                [(k, t) for k in keys],
            )
            n = self._db.execute("SELECT COUNT(*) FROM seen").fetchone()[0]
            if n > self.seen_capacity:
                self._db.execute(
                    "DELETE FROM seen WHERE key IN (SELECT key FROM seen ORDER BY last_seen LIMIT ?)",
                    (n - self.seen_capacity,),
                )
        counts: dict[bytes, int] = {}
        for i in range(0, len(keys), _SQL_VARS):
            part = keys[i : i + _SQL_VARS]
            q = f"SELECT key, count FROM seen WHERE key IN ({','.join('?' * len(part))})"
            counts.update(self._db.execute(q, part))
        return [counts.get(k, 1) for k in keys]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def error_kind(err: sqlite3.DatabaseError) -> str:
    """ "full" (the file system), "io" (a failed read or write: a file-size limit, a failing
    device), "readonly" (the file or its directory), "busy", or "damaged"."""
    text = str(err).lower()
    if "full" in text:
        return "full"
    if "i/o error" in text:
        return "io"
    if "readonly" in text or "read-only" in text or "unable to open" in text or "access permission" in text:
        return "readonly"
    if "locked" in text or "busy" in text:
        return "busy"
    return "damaged"


def index_error(file: str, err: sqlite3.DatabaseError) -> KvdriveError:
    """The one-line error for ``err`` on the index ``file``, with the fix for its cause."""
    kind = error_kind(err)
    where = os.path.dirname(os.path.abspath(file))
    fix = {
        "full": f"the file system of {where} is full: free space there (the cached chunks are intact)",
        "readonly": f"{where} cannot be written: make it writable or give the pool another directory "
        "(the cached chunks are intact)",
        "io": "reading or writing it failed (a file-size limit, a failing device?): fix that; the file "
        "itself may be intact",
        "busy": "another process holds it: give each process its own pool directory",
        "damaged": "the file is damaged: move it away to start an empty index (the extents' space is reused)",
    }
    return KvdriveError(f"prefix index {file}: {err}; {fix[kind]}")


def _other_geometry(file: str, have: str, want: str) -> KvdriveError:
    return KvdriveError(
        f"prefix index {file} holds chunks of geometry {have}, not {want} (another model shape, "
        "dtype, kv_dtype, chunk size or extent size); reopen it with those, or give this model its own "
        "directory (nothing was changed)"
    )


def _blob(values: list[int], dtype) -> bytes:
    return np.asarray(values, dtype=dtype).tobytes()


def _chunk(row) -> DiskChunk:
    key, path, slots, sums = row
    return DiskChunk(key, path, np.frombuffer(slots, np.int64).tolist(), np.frombuffer(sums, np.uint64).tolist())
