"""Disk tier: one SSD path as preallocated extent files of fixed slots.

A ``DiskDevice`` owns the extent files under one directory. Each extent is
``extent_bytes`` (a whole number of slots), created when the previous ones are full
and preallocated with ``posix_fallocate``, so the byte budget is enforced on
*physical* blocks (``st_blocks``), and a full file system surfaces as
``CapacityError`` when an extent is created, never mid-write. No file per group.

I/O is O_DIRECT when the path accepts it (probed once); otherwise a loud
``DirectIOWarning`` and buffered I/O that drops its pages (writes with O_DSYNC, then
``posix_fadvise(DONTNEED)``). Reads and writes use separate ``IoQueue``s so
write-behind never sits in front of a read. Every slot written gets an xxh3_64 of its
group bytes; a read whose data does not match, comes back short or fails is reported
per slot as a miss reason, never as data.

With ``persist_name`` the extents are named ``kvdrive-<persist_name>-<n>.extent``,
reopened by the next ``DiskDevice`` of that name and kept by ``close()``; the owner
of the slot index (the prefix pool) hands back live slots and their checksums with
``restore``. Extents beyond the budget are deleted on reopen, so the cap stays physical.
"""

from __future__ import annotations

import os
import threading
import uuid
import warnings
from concurrent.futures import Future

import numpy as np
import xxhash

from kvdrive.errors import CapacityError, KvdriveError
from kvdrive.storage import native_io
from kvdrive.storage.io_buffers import FreeList
from kvdrive.storage.io_engine import IoFaults, IoQueue, NoFaults, ShortTransfer, pread_run, pwrite_run
from kvdrive.storage.layout import GroupLayout
from kvdrive.storage.metrics import IoMetrics
from kvdrive.storage.probe import DirectIOWarning, probe_direct

DEFAULT_EXTENT_BYTES = 1 << 30
MAX_RUN_BYTES = 1 << 20  # longest coalesced preadv/pwritev; beyond this, more requests in flight win
assert MAX_RUN_BYTES // 4096 <= native_io.MAX_RUN_SLOTS
DIRECT_MODES = ("auto", "on", "off")


class DiskDevice:
    """Slots on one path. ``alloc``/``free`` run on the engine thread; I/O on worker threads."""

    def __init__(self, path: str, layout: GroupLayout, budget_bytes: int, *, direct: str = "auto",
                 read_depth: int = 32, write_depth: int = 4, extent_bytes: int = DEFAULT_EXTENT_BYTES,
                 faults: IoFaults | None = None, metrics: IoMetrics | None = None,
                 persist_name: str | None = None):
        if direct not in DIRECT_MODES:
            raise KvdriveError(f"direct must be one of {DIRECT_MODES}, got {direct!r}")
        if not os.path.isdir(path):
            raise KvdriveError(f"disk path {path!r} is not a directory")
        self.path = path
        self.layout = layout
        self.faults = faults or NoFaults()
        self.metrics = metrics or IoMetrics()
        sb = layout.slot_bytes
        self.num_slots = budget_bytes // sb
        self.extent_slots = max(1, min(extent_bytes // sb, self.num_slots))
        self.direct = self._choose_direct(direct)
        self.persistent = persist_name is not None
        self._tag = f"kvdrive-{persist_name}" if self.persistent else f"kvdrive-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._fds: list[int] = []
        self._paths: list[str] = []
        self._free = FreeList(0)
        self._exhausted: str | None = None  # why no further extent can be created
        self._sums = np.zeros(self.num_slots, dtype=np.uint64)
        self._valid = np.zeros(self.num_slots, dtype=bool)
        self._reads = IoQueue(read_depth, f"{self._tag}-r", self.metrics, "disk_read")
        self._writes = IoQueue(write_depth, f"{self._tag}-w", self.metrics, "disk_write")
        # Native batches run one at a time, each on read_depth (write_depth) threads: the queue
        # depth the disk was probed at (several batches at once put far more reads in flight,
        # where a disk can be slower, not faster).
        self._native_reads = IoQueue(1, f"{self._tag}-nr", self.metrics, "disk_read_batch")
        self._native_writes = IoQueue(1, f"{self._tag}-nw", self.metrics, "disk_write_batch")
        if self.persistent:
            self._reopen()

    def _choose_direct(self, mode: str) -> bool:
        if mode == "off":
            return False
        probe = probe_direct(self.path, self.faults)
        if probe.ok:
            return True
        if mode == "on":
            raise KvdriveError(f"{self.path}: O_DIRECT refused ({probe.reason}); use another path or direct='auto'")
        warnings.warn(f"{self.path}: O_DIRECT refused ({probe.reason}); using buffered I/O with page-cache "
                      f"dropping (posix_fadvise DONTNEED), which is slower", DirectIOWarning, stacklevel=3)
        return False

    # -- capacity -----------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Slots allocatable now or by growing extents (unless the file system refused)."""
        growable = 0 if self._exhausted else self.num_slots - self._free.capacity
        return self._free.num_free + growable

    @property
    def full_reason(self) -> str | None:
        """Why this device cannot grow further (the file system refused an extent), or None."""
        return self._exhausted

    @property
    def bytes_used(self) -> int:
        return self._free.num_used * self.layout.slot_bytes

    def physical_bytes(self) -> int:
        """Blocks really allocated to the extent files, from ``st_blocks``."""
        return sum(os.stat(p).st_blocks * 512 for p in self._paths)

    def alloc(self, n: int) -> list[int]:
        """``n`` slots, growing extents as needed; ``CapacityError`` (nothing taken) if impossible."""
        while self._free.num_free < n and self._grow():
            pass
        if self._free.num_free < n:
            why = f" ({self._exhausted})" if self._exhausted else ""
            raise CapacityError(f"disk {self.path}: {n} slots needed, {self._free.num_free} free{why}")
        return self._free.alloc(n)

    def free(self, slots) -> None:
        slots = list(slots)
        self._valid[slots] = False
        self._free.free(slots)

    def _grow(self) -> bool:
        have = self._free.capacity
        n = min(self.extent_slots, self.num_slots - have)
        if n <= 0 or self._exhausted:
            return False
        path = self._extent_path(len(self._paths))
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if self.direct else os.O_DSYNC)
        fd = os.open(path, flags, 0o600)
        try:
            nbytes = n * self.layout.slot_bytes
            self.faults.before("fallocate", path, 0, nbytes)
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as err:
            os.close(fd)
            os.unlink(path)
            self._exhausted = f"creating a {nbytes} B extent failed: {err.strerror or err}"
            return False
        self._fds.append(fd)
        self._paths.append(path)
        self._free.grow(n)
        return True

    # -- persistence (persist_name) ---------------------------------------------------

    def _extent_path(self, n: int) -> str:
        return os.path.join(self.path, f"{self._tag}-{n}.extent")

    def _reopen(self) -> None:
        """Open this name's extents that fit the budget, delete the rest; their slots start free."""
        n, size = 0, self.extent_slots * self.layout.slot_bytes
        while os.path.exists(self._extent_path(n)):
            path = self._extent_path(n)
            if (n + 1) * self.extent_slots > self.num_slots or os.path.getsize(path) != size:
                break
            flags = os.O_RDWR | (os.O_DIRECT if self.direct else os.O_DSYNC)
            self._fds.append(os.open(path, flags))
            self._paths.append(path)
            self._free.grow(self.extent_slots)
            n += 1
        while os.path.exists(self._extent_path(n)):  # over budget or of another geometry
            os.unlink(self._extent_path(n))
            n += 1

    def restore(self, slots: list[int], sums: list[int]) -> list[bool]:
        """Mark ``slots`` (of reopened extents) as holding data with checksums ``sums``.
        Returns per slot whether it was restored (False: outside the reopened extents or twice)."""
        cap = self._free.capacity
        ok = [0 <= s < cap and not self._valid[s] for s in slots]
        for s, good, c in zip(slots, ok, sums):
            if good:
                self._valid[s], self._sums[s] = True, c
        live = set(np.flatnonzero(self._valid[:cap]).tolist())
        fresh = FreeList(cap)
        fresh.alloc(cap)
        fresh.free([s for s in range(cap - 1, -1, -1) if s not in live])  # lowest slot handed out first
        self._free = fresh
        return ok

    def checksums(self, slots: list[int]) -> list[int]:
        """xxh3_64 of the data last written to each slot (valid once its write completed)."""
        return [int(self._sums[s]) for s in slots]

    def locate(self, slot: int) -> tuple[str, int]:
        """(extent file, byte offset) of ``slot``: for tools that read the files another way."""
        _, path, off = self._where(slot)
        return path, off

    def sync(self) -> None:
        """``fdatasync`` every extent: completed writes reach stable storage before an index names them."""
        for fd in self._fds:
            os.fdatasync(fd)

    # -- I/O --------------------------------------------------------------------------

    def _run_starts(self, slots: np.ndarray) -> np.ndarray:
        """Where the runs of ``slots`` (sorted) begin, and ``len(slots)`` last: a run is consecutive
        slots of one extent, at most ``MAX_RUN_BYTES`` (one preadv/pwritev each)."""
        brk = np.ones(len(slots), dtype=bool)
        brk[1:] = (np.diff(slots) != 1) | (slots[1:] % self.extent_slots == 0)
        start = np.flatnonzero(brk)
        pos = np.arange(len(slots)) - np.repeat(start, np.diff(np.append(start, len(slots))))
        brk |= pos % max(1, MAX_RUN_BYTES // self.layout.slot_bytes) == 0  # cap run length
        return np.append(np.flatnonzero(brk), len(slots))

    def _runs(self, slots: list[int], bufs: list):
        """Group (slot, buf) into runs of consecutive slots in one extent; yields (indices, slots, bufs)."""
        order = np.argsort(np.asarray(slots, dtype=np.int64), kind="stable")
        first = self._run_starts(np.asarray(slots, dtype=np.int64)[order])
        for lo, hi in zip(first[:-1].tolist(), first[1:].tolist()):
            run = order[lo:hi].tolist()
            yield run, [slots[j] for j in run], [bufs[j] for j in run]

    def _where(self, slot: int) -> tuple[int, str, int]:
        e, i = divmod(slot, self.extent_slots)
        return self._fds[e], self._paths[e], i * self.layout.slot_bytes

    def read(self, slots: list[int], bufs: list) -> BatchFuture:
        """Read each slot into its ``slot_bytes`` buffer. Result: per slot None (ok) or a miss reason."""
        ok = [i for i, s in enumerate(slots) if self._valid[s]]
        absent = [i for i, s in enumerate(slots) if not self._valid[s]]
        runs = [([ok[j] for j in idx], s, b)
                for idx, s, b in self._runs([slots[i] for i in ok], [bufs[i] for i in ok])]
        parts = self._shards(self._reads, lambda run: self._read_run(run[1], run[2]), runs)
        if absent:
            parts.append((absent, _done(["absent"] * len(absent))))
        return BatchFuture(len(slots), parts)

    def read_to(self, slots: np.ndarray, dsts: np.ndarray) -> BatchFuture:
        """``read`` into ``slot_bytes`` of host memory at each address ``dsts[i]`` (ALIGN-aligned,
        kept alive by the caller until the result is in). The whole batch is one native call
        outside the GIL (``native_io``) where it is built and no faults are injected; otherwise
        the Python path of ``read``. Same per-slot results."""
        slots, dsts = np.asarray(slots, dtype=np.int64), np.asarray(dsts, dtype=np.uint64)
        fn = self._native()
        if fn is None:
            sb = self.layout.slot_bytes
            return self.read(slots.tolist(), [native_io.view(d, sb) for d in dsts.tolist()])
        ok = self._valid[slots]
        idx = np.flatnonzero(ok)[np.argsort(slots[ok], kind="stable")]  # by slot: neighbours coalesce
        parts = []
        if len(idx):
            parts.append((idx.tolist(), self._native_reads.map_shards(lambda req: self._read_native(fn, *req),
                                                                       [(slots[idx], dsts[idx])])[0][1]))
        if not ok.all():
            absent = np.flatnonzero(~ok).tolist()
            parts.append((absent, _done(["absent"] * len(absent))))
        return BatchFuture(len(slots), parts)

    def write_from(self, slots: np.ndarray, srcs: np.ndarray, before=None) -> BatchFuture:
        """``write`` from ``slot_bytes`` of host memory at each address ``srcs[i]``: one native
        call (after ``before()``) where ``read_to`` would use one, else the Python path."""
        slots, srcs = np.asarray(slots, dtype=np.int64), np.asarray(srcs, dtype=np.uint64)
        fn = self._native()
        if fn is None:
            sb = self.layout.slot_bytes
            return self.write(slots.tolist(), [native_io.view(x, sb) for x in srcs.tolist()], before)
        idx = np.argsort(slots, kind="stable")
        fut = self._native_writes.map_shards(lambda req: self._write_native(fn, *req), [(slots[idx], srcs[idx], before)])
        return BatchFuture(len(slots), [(idx.tolist(), fut[0][1])])

    def _native(self):
        """The native batch function, or None: not built, or faults injected (they live on the Python path)."""
        return native_io.reader() if isinstance(self.faults, NoFaults) else None

    def _transfer_native(self, fn, slots: np.ndarray, bases: np.ndarray, write: bool, sums: np.ndarray):
        """Move ``slots`` (sorted) in runs of consecutive slots of one extent, checksumming in the
        native threads where they can; returns per-slot (status, checked: see transfer_batch)."""
        sb, es = self.layout.slot_bytes, self.extent_slots
        first = self._run_starts(slots)
        head = slots[first[:-1]]
        fds = np.asarray(self._fds, dtype=np.int32)[head // es]
        queue = self._writes if write else self._reads
        status, secs, checked = native_io.transfer_batch(
            fn, fds, (head % es) * sb, first, bases, np.full(len(slots), sb), threads=queue.depth,
            dontneed=not self.direct, write=write, hash_len=self.layout.group_bytes, sums=sums)
        self.metrics.latencies("disk_write" if write else "disk_read", secs)
        return np.repeat(status, np.diff(first)), checked

    def _read_native(self, fn, slots: np.ndarray, dsts: np.ndarray) -> list[str | None]:
        want = np.ascontiguousarray(self._sums[slots])
        per, bad = self._transfer_native(fn, slots, dsts, write=False, sums=want)
        gb = self.layout.group_bytes
        if bad is None:  # no native hash: check here, holding the GIL per slot
            bad = np.array([xxhash.xxh3_64_intdigest(native_io.at(d, gb)) != w
                            for d, w in zip(dsts.tolist(), want.tolist())], dtype=bool)
        out = np.full(len(slots), None, dtype=object)
        out[per == -1] = "short_read"
        out[(per != 0) & (per != -1)] = "io_error"
        out[(per == 0) & bad] = "checksum"
        good = int(((per == 0) & ~bad).sum())
        self.metrics.moved("disk->host", gb * good, good)
        return out.tolist()

    def _write_native(self, fn, slots: np.ndarray, srcs: np.ndarray, before) -> list[str | None]:
        if before is not None:
            before()
        gb = self.layout.group_bytes
        if native_io.xxh3_address() is None:  # no native hash: checksum here, before the write
            sums = np.array([xxhash.xxh3_64_intdigest(native_io.at(x, gb)) for x in srcs.tolist()], dtype=np.uint64)
        else:
            sums = np.zeros(len(slots), dtype=np.uint64)  # filled by the native threads
        per, _ = self._transfer_native(fn, slots, srcs, write=True, sums=sums)
        ok = per == 0
        self._sums[slots[ok]] = sums[ok]
        self._valid[slots[ok]] = True
        self.metrics.moved("host->disk", gb * int(ok.sum()), int(ok.sum()))
        if not ok.all():
            self.metrics.write_error(int((~ok).sum()))
        return [None if x else "io_error" for x in ok.tolist()]

    def write(self, slots: list[int], bufs: list, before=None) -> BatchFuture:
        """Write each buffer to its slot (``before()`` first, e.g. wait for a GPU copy). Per slot None or "io_error"."""
        if before is not None:
            before = _Once(before)
        runs = list(self._runs(slots, bufs))
        return BatchFuture(len(slots), self._shards(self._writes, lambda run: self._write_run(run[1], run[2], before),
                                                    runs))

    @staticmethod
    def _shards(queue: IoQueue, fn, runs) -> list:
        return [([i for run in shard for i in run[0]], fut) for shard, fut in queue.map_shards(fn, runs)]

    def _read_run(self, slots: list[int], bufs: list) -> list[str | None]:
        fd, path, off = self._where(slots[0])
        try:
            pread_run(fd, path, bufs, off, self.faults)
        except ShortTransfer:
            return ["short_read"] * len(slots)
        except OSError:
            return ["io_error"] * len(slots)
        finally:
            if not self.direct:
                os.posix_fadvise(fd, off, len(slots) * self.layout.slot_bytes, os.POSIX_FADV_DONTNEED)
        gb = self.layout.group_bytes
        out = [None if xxhash.xxh3_64_intdigest(b[:gb]) == int(self._sums[s]) else "checksum"
               for s, b in zip(slots, bufs)]
        self.metrics.moved("disk->host", gb * out.count(None), out.count(None))
        return out

    def _write_run(self, slots: list[int], bufs: list, before) -> list[str | None]:
        if before is not None:
            before()
        gb = self.layout.group_bytes
        sums = [xxhash.xxh3_64_intdigest(b[:gb]) for b in bufs]
        fd, path, off = self._where(slots[0])
        try:
            pwrite_run(fd, path, bufs, off, self.faults)
        except OSError:
            self.metrics.write_error(len(slots))
            return ["io_error"] * len(slots)
        finally:
            if not self.direct:
                os.posix_fadvise(fd, off, len(slots) * self.layout.slot_bytes, os.POSIX_FADV_DONTNEED)
        self._sums[slots] = sums
        self._valid[slots] = True
        self.metrics.moved("host->disk", gb * len(slots), len(slots))
        return [None] * len(slots)

    def close(self, remove: bool | None = None) -> None:
        """Stop the queues and close the extents; they are deleted unless the device is
        persistent (``remove`` overrides)."""
        for queue in (self._reads, self._writes, self._native_reads, self._native_writes):
            queue.shutdown()
        remove = not self.persistent if remove is None else remove
        for fd, path in zip(self._fds, self._paths):
            os.close(fd)
            if remove:
                os.unlink(path)
        self._fds, self._paths = [], []


class _Once:
    """Call ``fn`` once, whichever worker thread gets there first; the others wait for it."""

    def __init__(self, fn):
        self._fn = fn
        self._lock = threading.Lock()
        self._called = False

    def __call__(self):
        with self._lock:
            if not self._called:
                self._fn()
                self._called = True


def _done(value) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


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
