"""Counters of the KV store and their typed, immutable snapshot.

``StoreMetrics`` is written from the engine thread and from I/O worker threads, so
every update holds one lock (cheap: a few integer adds). ``snapshot`` copies
everything into a ``MetricsSnapshot`` that a caller may keep and a later server
exports (Prometheus names: ``kvdrive_store_<field>``).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

DIRECTIONS = ("host->gpu", "gpu->host", "gpu->gpu", "disk->host", "host->disk")
TIERS = ("gpu", "host", "disk")
# Why a requested group was not returned. "absent": never stored or freed/evicted without
# a lower copy; the others are integrity failures: the data existed and was refused.
MISS_REASONS = ("absent", "checksum", "io_error", "short_read")
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
class TierUsage:
    used_bytes: int  # bytes of slots holding groups
    capacity_bytes: int  # budget in whole slots
    physical_bytes: int = 0  # disk: blocks allocated in the extent files (st_blocks * 512)


@dataclass(frozen=True)
class MetricsSnapshot:
    moved: dict[str, Transfer]
    hits: dict[str, int]  # tier -> groups served from it
    misses: dict[str, int]  # reason -> groups
    write_errors: int
    queue_depth: int  # disk requests in flight now
    max_queue_depth: int
    latency: dict[str, Latency]
    capacity: dict[str, TierUsage] = field(default_factory=dict)

    @property
    def requested(self) -> int:
        return sum(self.hits.values()) + sum(self.misses.values())

    @property
    def hit_rate(self) -> float:
        return sum(self.hits.values()) / self.requested if self.requested else 0.0


class StoreMetrics:
    """Thread-safe counters; ``snapshot()`` reads them all at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._bytes = dict.fromkeys(DIRECTIONS, 0)
        self._groups = dict.fromkeys(DIRECTIONS, 0)
        self._hits = dict.fromkeys(TIERS, 0)
        self._misses = dict.fromkeys(MISS_REASONS, 0)
        self._write_errors = 0
        self._depth = 0
        self._max_depth = 0
        self._samples: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(LATENCY_WINDOW))
        self._counts: dict[str, int] = defaultdict(int)

    def moved(self, direction: str, nbytes: int, groups: int) -> None:
        with self._lock:
            self._bytes[direction] += nbytes
            self._groups[direction] += groups

    def hit(self, tier: str, n: int = 1) -> None:
        with self._lock:
            self._hits[tier] += n

    def miss(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self._misses[reason] += n

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

    def snapshot(self, capacity: dict[str, TierUsage] | None = None) -> MetricsSnapshot:
        with self._lock:
            lat = {}
            for op, n in self._counts.items():
                s = self._samples[op][: min(n, LATENCY_WINDOW)] * _S_TO_MS
                p50, p90, p99 = np.percentile(s, [50, 90, 99])
                lat[op] = Latency(n, float(p50), float(p90), float(p99), float(s.max()))
            return MetricsSnapshot(
                moved={d: Transfer(self._bytes[d], self._groups[d]) for d in DIRECTIONS},
                hits=dict(self._hits),
                misses=dict(self._misses),
                write_errors=self._write_errors,
                queue_depth=self._depth,
                max_queue_depth=self._max_depth,
                latency=lat,
                capacity=dict(capacity or {}),
            )
