"""Counters of a disk device's I/O and their typed, immutable snapshot.

``IoMetrics`` is written from the engine thread and from I/O worker threads, so every
update holds one lock (cheap: a few integer adds). ``snapshot`` copies everything into a
``MetricsSnapshot`` that a caller may keep and export.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

DIRECTIONS = ("disk->host", "host->disk")
LATENCY_WINDOW = 8192  # most recent samples kept per operation for percentiles
_S_TO_MS = 1e3


@dataclass(frozen=True)
class Transfer:
    bytes: int = 0
    groups: int = 0


@dataclass(frozen=True)
class Latency:
    count: int  # samples ever recorded
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float  # over the window


@dataclass(frozen=True)
class MetricsSnapshot:
    moved: dict[str, Transfer]
    write_errors: int
    queue_depth: int  # disk requests in flight now
    max_queue_depth: int
    latency: dict[str, Latency]


class IoMetrics:
    """Thread-safe counters; ``snapshot()`` reads them all at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._bytes = dict.fromkeys(DIRECTIONS, 0)
        self._groups = dict.fromkeys(DIRECTIONS, 0)
        self._write_errors = 0
        self._depth = 0
        self._max_depth = 0
        self._samples: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(LATENCY_WINDOW))
        self._counts: dict[str, int] = defaultdict(int)

    def moved(self, direction: str, nbytes: int, groups: int) -> None:
        with self._lock:
            self._bytes[direction] += nbytes
            self._groups[direction] += groups

    def write_error(self, n: int = 1) -> None:
        with self._lock:
            self._write_errors += n

    def io_started(self) -> None:
        with self._lock:
            self._depth += 1
            self._max_depth = max(self._max_depth, self._depth)

    def io_finished(self) -> None:
        with self._lock:
            self._depth -= 1

    def latency(self, op: str, seconds: float) -> None:
        with self._lock:
            i = self._counts[op]
            self._samples[op][i % LATENCY_WINDOW] = seconds
            self._counts[op] = i + 1

    def latencies(self, op: str, seconds: np.ndarray) -> None:
        """Many samples under one lock (a native batch's per-request latencies)."""
        seconds = seconds[-LATENCY_WINDOW:]
        with self._lock:
            i = self._counts[op]
            self._samples[op][(i + np.arange(len(seconds))) % LATENCY_WINDOW] = seconds
            self._counts[op] = i + len(seconds)

    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            lat = {}
            for op, n in self._counts.items():
                s = self._samples[op][: min(n, LATENCY_WINDOW)] * _S_TO_MS
                p50, p90, p99 = np.percentile(s, [50, 90, 99])
                lat[op] = Latency(n, float(p50), float(p90), float(p99), float(s.max()))
            return MetricsSnapshot(
                moved={d: Transfer(self._bytes[d], self._groups[d]) for d in DIRECTIONS},
                write_errors=self._write_errors,
                queue_depth=self._depth,
                max_queue_depth=self._max_depth,
                latency=lat,
            )
