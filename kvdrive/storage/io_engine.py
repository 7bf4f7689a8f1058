"""The syscall layer of the disk tier: vectored reads and writes, a queue, a fault hook.

Every disk transfer goes through ``pread_run``/``pwrite_run``: one ``preadv`` or
``pwritev`` of a run of consecutive file slots into a list of slot buffers. Before the
syscall, the ``IoFaults`` hook is consulted; tests use ``InjectedFaults`` to produce
EIO, ENOSPC or short transfers exactly where they want them, and ``storage.faults``
(``KVDRIVE_FAULTS``) draws faults by seed, silent corruptions included (``on_write``
alters what reaches the disk, ``on_read`` what came back).

``BatchFuture`` gathers the per-slot results of a batch split into parts (runs of one
extent, devices of a pool), in input order (None: done; else a miss or error reason).

``IoQueue`` is a thread pool whose size is the queue depth: CPython releases the GIL
inside ``preadv``/``pwritev``, so N threads keep N requests in flight on the device.
NOTE: io_uring was considered; no PyPI binding works cleanly here (``liburing``
2026.3.30 dies with SIGILL on construction on the dev machine), so threads it is.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kvdrive.storage.metrics import IoMetrics


class ShortTransfer(OSError):
    """A read or write moved fewer bytes than asked (end of file, device trouble)."""


class IoFaults(ABC):
    """Consulted before every syscall of the I/O layer.

    ``before`` returns how many bytes the syscall may move (``nbytes`` for no fault,
    fewer for a simulated short transfer) or raises ``OSError`` to simulate an error.
    ``op`` is one of "read", "write", "open_direct", "fallocate". Called from I/O
    worker threads: implementations must be thread-safe.
    """

    @abstractmethod
    def before(self, op: str, path: str, offset: int, nbytes: int) -> int: ...

    def on_write(self, path: str, offset: int, bufs: list) -> list:
        """The buffers a write really puts on disk (default: ``bufs``). A silent corruption
        returns altered copies; the caller still believes, and checksummed, ``bufs``."""
        return bufs

    def on_read(self, path: str, offset: int, bufs: list) -> None:
        """After a read that moved every byte: may alter ``bufs`` in place (corruption in flight)."""


class NoFaults(IoFaults):
    def before(self, op: str, path: str, offset: int, nbytes: int) -> int:
        return nbytes


@dataclass
class _Rule:
    op: str
    error: int | None  # errno to raise, or None for a short transfer
    offset: int | None  # only at this file offset (any if None)
    path_contains: str | None
    times: int  # how many more times it fires; < 0 = forever


class InjectedFaults(IoFaults):
    """Fault hook for tests: ``fail("read", errno.EIO, offset=...)``, ``short("read")``."""

    def __init__(self):
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self.fired = 0

    def fail(self, op: str, error: int = errno.EIO, *, offset=None, path_contains=None, times: int = 1):
        self._rules.append(_Rule(op, error, offset, path_contains, times))
        return self

    def short(self, op: str, *, offset=None, path_contains=None, times: int = 1):
        self._rules.append(_Rule(op, None, offset, path_contains, times))
        return self

    def before(self, op: str, path: str, offset: int, nbytes: int) -> int:
        with self._lock:
            for r in self._rules:
                if r.times == 0 or r.op != op or (r.offset is not None and r.offset != offset):
                    continue
                if r.path_contains is not None and r.path_contains not in path:
                    continue
                r.times -= 1
                self.fired += 1
                if r.error is None:
                    return nbytes // 2
                raise OSError(r.error, f"injected {errno.errorcode.get(r.error, r.error)}", path)
        return nbytes


def _transfer(syscall, op: str, fd: int, path: str, bufs: list, offset: int, faults: IoFaults) -> None:
    nbytes = sum(len(b) for b in bufs)
    allowed = faults.before(op, path, offset, nbytes)
    if allowed < nbytes:
        raise ShortTransfer(errno.EIO, f"short {op}: {allowed} of {nbytes} bytes", path)
    done = syscall(fd, faults.on_write(path, offset, bufs) if op == "write" else bufs, offset)
    if done != nbytes:
        raise ShortTransfer(errno.EIO, f"short {op}: {done} of {nbytes} bytes at offset {offset}", path)
    if op == "read":
        faults.on_read(path, offset, bufs)


def pread_run(fd: int, path: str, bufs: list, offset: int, faults: IoFaults) -> None:
    """Fill ``bufs`` (consecutive in the file from ``offset``) with one preadv; raises OSError."""
    _transfer(os.preadv, "read", fd, path, bufs, offset, faults)


def pwrite_run(fd: int, path: str, bufs: list, offset: int, faults: IoFaults) -> None:
    _transfer(os.pwritev, "write", fd, path, bufs, offset, faults)


class IoQueue:
    """``depth`` worker threads, each working through its share of a batch.

    ``map_shards`` splits a batch of requests round-robin into at most ``depth`` shards,
    one task per shard: exactly ``depth`` syscalls in flight at a time, and one executor
    hand-off per shard instead of one per request (each costs microseconds, which
    matters at tens of thousands of 64 KiB reads per second). Per-request latency and
    the number of busy workers (the queue depth) go to ``metrics``.
    """

    def __init__(self, depth: int, name: str, metrics: IoMetrics, op: str):
        if depth <= 0:
            raise ValueError(f"queue depth must be positive, got {depth}")
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix=name)
        self._metrics = metrics
        self._op = op
        # every worker started now: the executor starts them lazily, so a long-lived queue's thread
        # count crept up call after call until it reached ``depth``
        started = threading.Barrier(depth + 1)
        for _ in range(depth):
            self._pool.submit(started.wait)
        started.wait()

    def map_shards(self, fn, requests: list) -> list[tuple[list, Future]]:
        """Run ``fn(request) -> list`` for each request; returns (requests of the shard, future of
        the concatenated results) per shard."""
        shards = [requests[i :: self.depth] for i in range(min(self.depth, len(requests)))]
        return [(shard, self._submit(self._run_shard, fn, shard)) for shard in shards]

    def _submit(self, fn, *args) -> Future:
        self._metrics.io_started()
        return self._pool.submit(fn, *args)

    def _run_shard(self, fn, shard: list) -> list:
        try:
            out = []
            for req in shard:
                t0 = time.perf_counter()
                out.extend(fn(req))
                self._metrics.latency(self._op, time.perf_counter() - t0)
            return out
        finally:
            self._metrics.io_finished()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class BatchFuture:
    """Per-item results of a batch split into parts (runs, devices); ``result()`` waits and
    restores input order. A part is anything with ``done()`` and ``result() -> list``."""

    def __init__(self, n: int, parts: list[tuple[list[int], Future | BatchFuture]]):
        self._n = n
        self._parts = parts

    def done(self) -> bool:
        return all(f.done() for _, f in self._parts)

    def result(self) -> list[str | None]:
        out: list[str | None] = [None] * self._n
        for idx, fut in self._parts:
            for i, r in zip(idx, fut.result()):
                out[i] = r
        return out

    def ok(self) -> np.ndarray:
        """(n,) bool: which items succeeded (waits like ``result``)."""
        return np.array([r is None for r in self.result()], dtype=bool)
