"""Disk tier: ``DiskDevice``, the slots of one SSD path and the batched I/O on them.

The extent files, their slots and each slot's checksum record are ``ExtentFiles``
(``extent_files``); this module moves slot data in and out of them. Reads and writes use
separate ``IoQueue``s so write-behind never sits in front of a read. A batch is coalesced
into runs of consecutive slots of one extent, at most ``MAX_RUN_BYTES`` each (one
preadv/pwritev); where ``native_io`` is built and no faults are injected, a whole batch is
one native call outside the GIL. Buffered I/O (no O_DIRECT) drops the pages it moved
(``posix_fadvise(DONTNEED)``).

Every slot written gets an xxh3_64 of its group bytes; a read whose data does not match,
comes back short or fails is reported per slot as a miss reason, never as data. A read
that fails is read once more, alone (a transient EIO, a short read or a flipped bit in
flight recover); what fails twice is counted and warned about once per device
(``ReadFailureWarning``), never served. A failed write is tried once more before it is
reported.
"""

from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import Future

import numpy as np
import xxhash

from kvdrive.storage import native_io
from kvdrive.storage.extent_files import DEFAULT_EXTENT_BYTES, ExtentFiles
from kvdrive.storage.io_engine import BatchFuture, IoFaults, IoQueue, NoFaults, ShortTransfer, pread_run, pwrite_run
from kvdrive.storage.layout import GroupLayout
from kvdrive.storage.metrics import IoMetrics

MAX_RUN_BYTES = 1 << 20  # longest coalesced preadv/pwritev; beyond this, more requests in flight win
assert MAX_RUN_BYTES // 4096 <= native_io.MAX_RUN_SLOTS
READ_BYTES_IN_FLIGHT = 32 << 20  # what 32 reads of bf16's 1 MiB prefix chunk keep in flight
MAX_READ_DEPTH = 128
READ_RETRIES = 1  # a failed slot read is tried this many more times, alone, before it is a miss
WRITE_RETRIES = 1  # a failed write is tried this many more times before it is reported


class ReadFailureWarning(UserWarning):
    """Slot reads of a disk failed (I/O error, short read or checksum) even after a retry."""


def read_depth_for(slot_bytes: int, floor: int = 32) -> int:
    """Reads in flight that keep ``READ_BYTES_IN_FLIGHT`` moving for slots of ``slot_bytes``
    (at least ``floor``, at most ``MAX_READ_DEPTH``): a compressed slot is a half or a quarter
    of a bf16 one, and at the same depth the disk would see that much less in flight."""
    return max(floor, min(MAX_READ_DEPTH, -(-READ_BYTES_IN_FLIGHT // slot_bytes)))


class DiskDevice(ExtentFiles):
    """Slots on one path. ``alloc``/``free`` run on the engine thread; I/O on worker threads."""

    def __init__(
        self,
        path: str,
        layout: GroupLayout,
        budget_bytes: int,
        *,
        direct: str = "auto",
        read_depth: int = 32,
        write_depth: int = 4,
        extent_bytes: int = DEFAULT_EXTENT_BYTES,
        faults: IoFaults | None = None,
        metrics: IoMetrics | None = None,
        persist_name: str | None = None,
    ):
        self.metrics = metrics or IoMetrics()
        self.read_failures = 0  # slot reads that failed after their retry
        self.read_retries = 0  # slot reads tried again (recovered: read_retries - read_failures)
        self._warned_reads = False
        super().__init__(
            path,
            layout,
            budget_bytes,
            direct=direct,
            extent_bytes=extent_bytes,
            faults=faults,
            persist_name=persist_name,
        )
        self._reads = IoQueue(read_depth, f"{self._tag}-r", self.metrics, "disk_read")
        self._writes = IoQueue(write_depth, f"{self._tag}-w", self.metrics, "disk_write")
        # Native batches run one at a time, each on read_depth (write_depth) threads: the queue
        # depth the disk was probed at (several batches at once put far more reads in flight,
        # where a disk can be slower, not faster).
        self._native_reads = IoQueue(1, f"{self._tag}-nr", self.metrics, "disk_read_batch")
        self._native_writes = IoQueue(1, f"{self._tag}-nw", self.metrics, "disk_write_batch")

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

    def read(self, slots: list[int], bufs: list, sums: list[int] | None = None) -> BatchFuture:
        """Read each slot into its ``slot_bytes`` buffer. Result: per slot None (ok) or a miss reason.
        ``sums``: the xxh3_64 each slot must match (the caller's own record, e.g. an index row);
        default: the checksum of the slot's last write here."""
        ok = [i for i, s in enumerate(slots) if self._valid[s]]
        absent = [i for i, s in enumerate(slots) if not self._valid[s]]
        want = [int(self._sums[s]) for s in slots] if sums is None else [int(x) for x in sums]
        runs = [
            ([ok[j] for j in idx], s, b, [want[ok[j]] for j in idx])
            for idx, s, b in self._runs([slots[i] for i in ok], [bufs[i] for i in ok])
        ]
        parts = self._shards(self._reads, lambda run: self._read_run(run[1], run[2], run[3]), runs)
        if absent:
            parts.append((absent, _done(["absent"] * len(absent))))
        return BatchFuture(len(slots), parts)

    def read_to(self, slots: np.ndarray, dsts: np.ndarray, sums: np.ndarray | None = None) -> BatchFuture:
        """``read`` into ``slot_bytes`` of host memory at each address ``dsts[i]`` (ALIGN-aligned,
        kept alive by the caller until the result is in). The whole batch is one native call
        outside the GIL (``native_io``) where it is built and no faults are injected; otherwise
        the Python path of ``read``. Same per-slot results; ``sums`` as in ``read``."""
        slots, dsts = np.asarray(slots, dtype=np.int64), np.asarray(dsts, dtype=np.uint64)
        fn = self._native()
        if fn is None:
            sb = self.layout.slot_bytes
            views = [native_io.view(d, sb) for d in dsts.tolist()]
            return self.read(slots.tolist(), views, None if sums is None else np.asarray(sums).tolist())
        want = self._sums[slots] if sums is None else np.asarray(sums, dtype=np.uint64)
        ok = self._valid[slots]
        idx = np.flatnonzero(ok)[np.argsort(slots[ok], kind="stable")]  # by slot: neighbours coalesce
        parts = []
        if len(idx):
            req = (slots[idx], dsts[idx], np.ascontiguousarray(want[idx]))
            parts.append(
                (idx.tolist(), self._native_reads.map_shards(lambda r: self._read_native(fn, *r), [req])[0][1])
            )
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
        fut = self._native_writes.map_shards(
            lambda req: self._write_native(fn, *req), [(slots[idx], srcs[idx], before)]
        )
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
            fn,
            fds,
            (head % es) * sb,
            first,
            bases,
            np.full(len(slots), sb),
            threads=queue.depth,
            dontneed=not self.direct,
            write=write,
            hash_len=self.layout.stored_bytes,
            sums=sums,
        )
        self.metrics.latencies("disk_write" if write else "disk_read", secs)
        return np.repeat(status, np.diff(first)), checked

    def _read_native(self, fn, slots: np.ndarray, dsts: np.ndarray, want: np.ndarray) -> list[str | None]:
        per, bad = self._transfer_native(fn, slots, dsts, write=False, sums=want)
        gb = self.layout.stored_bytes
        if bad is None:  # no native hash: check here, holding the GIL per slot
            bad = np.array(
                [xxhash.xxh3_64_intdigest(native_io.at(d, gb)) != w for d, w in zip(dsts.tolist(), want.tolist())],
                dtype=bool,
            )
        out = np.full(len(slots), None, dtype=object)
        out[per == -1] = "short_read"
        out[(per != 0) & (per != -1)] = "io_error"
        out[(per == 0) & bad] = "checksum"
        sb = self.layout.slot_bytes
        for i in np.flatnonzero((per != 0) | bad).tolist():  # read again alone
            self.read_retries += 1
            for _ in range(READ_RETRIES):
                s = int(slots[i])
                out[i] = self._read_once([s], [native_io.view(int(dsts[i]), sb)], [int(want[i])])[0]
                if out[i] is None:
                    break
        out = out.tolist()
        self._count_failures(out)
        good = out.count(None)
        self.metrics.moved("disk->host", gb * good, good)
        return out

    def _write_native(self, fn, slots: np.ndarray, srcs: np.ndarray, before) -> list[str | None]:
        if before is not None:
            before()
        gb = self.layout.stored_bytes
        if native_io.xxh3_address() is None:  # no native hash: checksum here, before the write
            sums = np.array([xxhash.xxh3_64_intdigest(native_io.at(x, gb)) for x in srcs.tolist()], dtype=np.uint64)
        else:
            sums = np.zeros(len(slots), dtype=np.uint64)  # filled by the native threads
        per, _ = self._transfer_native(fn, slots, srcs, write=True, sums=sums)
        ok = per == 0
        sb = self.layout.slot_bytes
        for i in np.flatnonzero(~ok).tolist():  # written once more, alone
            buf = native_io.view(int(srcs[i]), sb)
            sums[i] = xxhash.xxh3_64_intdigest(buf[:gb])
            ok[i] = any(self._write_once([int(slots[i])], [buf]) for _ in range(WRITE_RETRIES))
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
        return BatchFuture(
            len(slots), self._shards(self._writes, lambda run: self._write_run(run[1], run[2], before), runs)
        )

    @staticmethod
    def _shards(queue: IoQueue, fn, runs) -> list:
        return [([i for run in shard for i in run[0]], fut) for shard, fut in queue.map_shards(fn, runs)]

    def _read_run(self, slots: list[int], bufs: list, want: list[int]) -> list[str | None]:
        """One preadv of a run, checked against ``want``; each slot that failed is read again alone."""
        out = self._read_once(slots, bufs, want)
        for _ in range(READ_RETRIES):
            bad = [i for i, why in enumerate(out) if why is not None]
            if not bad:
                break
            self.read_retries += len(bad)
            for i in bad:
                out[i] = self._read_once([slots[i]], [bufs[i]], [want[i]])[0]
        self._count_failures(out)
        gb = self.layout.stored_bytes
        self.metrics.moved("disk->host", gb * out.count(None), out.count(None))
        return out

    def _read_once(self, slots: list[int], bufs: list, want: list[int]) -> list[str | None]:
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
        gb = self.layout.stored_bytes
        return [None if xxhash.xxh3_64_intdigest(b[:gb]) == w else "checksum" for b, w in zip(bufs, want)]

    def _count_failures(self, out: list) -> None:
        """Count the slots that failed for good; the first such failure of a device warns."""
        failed = [why for why in out if why is not None]
        if not failed:
            return
        self.read_failures += len(failed)  # from I/O threads: a lost count is harmless, a lock per run is not
        if not self._warned_reads:
            self._warned_reads = True
            warnings.warn(
                f"{self.path}: a slot read failed twice ({failed[0]}); its data is not served (the "
                "prefix pool recomputes the chunk, the tiered cache counts the group as lost); "
                "read_failures counts them",
                ReadFailureWarning,
                stacklevel=2,
            )

    def _write_run(self, slots: list[int], bufs: list, before) -> list[str | None]:
        """One pwritev of a run; a run that failed is written once more (a transient EIO or short write)."""
        if before is not None:
            before()
        gb = self.layout.stored_bytes
        sums = [xxhash.xxh3_64_intdigest(b[:gb]) for b in bufs]
        for _ in range(1 + WRITE_RETRIES):
            if self._write_once(slots, bufs):
                break
        else:
            self.metrics.write_error(len(slots))
            return ["io_error"] * len(slots)
        self._sums[slots] = sums
        self._valid[slots] = True
        self.metrics.moved("host->disk", gb * len(slots), len(slots))
        return [None] * len(slots)

    def _write_once(self, slots: list[int], bufs: list) -> bool:
        fd, path, off = self._where(slots[0])
        try:
            pwrite_run(fd, path, bufs, off, self.faults)
        except OSError as err:
            self.last_write_error = err.strerror or str(err)
            return False
        finally:
            if not self.direct:
                os.posix_fadvise(fd, off, len(slots) * self.layout.slot_bytes, os.POSIX_FADV_DONTNEED)
        return True

    def close(self, remove: bool | None = None) -> None:
        """Stop the queues, then close the extents (``ExtentFiles.close``)."""
        if not self._cleanup.alive:
            return
        for queue in (self._reads, self._writes, self._native_reads, self._native_writes):
            queue.shutdown()
        super().close(remove)


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
