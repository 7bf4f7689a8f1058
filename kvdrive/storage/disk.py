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

Every extent is ``extent_bytes`` except the last, which may be shorter (a budget that is
not a multiple of it, or a file system that took only part of an extent: then the device
stops growing there). A read that fails is read once more, alone (a transient EIO, a
short read or a flipped bit in flight recover); what fails twice is counted and warned
about once per device (``ReadFailureWarning``), never served. A failed write is tried once
more before it is reported.

Ownership (``dir_lock``): a device locks its files for its lifetime. A private device
(no ``persist_name``) names them after a fresh per-process lock and deletes them on
``close`` or when it is garbage collected or the interpreter exits; every device deletes,
at open, the files of private owners that died in its directory (kill -9). With ``persist_name`` the extents are named
``kvdrive-<persist_name>-<n>.extent`` under the lock ``kvdrive-<persist_name>.lock``
(a second owner is refused: ``DirectoryInUse``), reopened by the next ``DiskDevice`` of
that name and kept by ``close()``; the owner of the slot index (the prefix pool) hands
back live slots and their checksums with ``restore``. Reopening never deletes: extents
that do not fit the budget or the extent size are refused before anything is touched; a
missing extent between others is created again, empty.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import threading
import warnings
import weakref
from concurrent.futures import Future

import numpy as np
import xxhash

from kvdrive.errors import CapacityError, KvdriveError
from kvdrive.storage import native_io
from kvdrive.storage.dir_lock import DirLock, sweep_stale
from kvdrive.storage.faults import from_env as faults_from_env
from kvdrive.storage.io_buffers import FreeList
from kvdrive.storage.io_engine import IoFaults, IoQueue, NoFaults, ShortTransfer, pread_run, pwrite_run
from kvdrive.storage.layout import GroupLayout
from kvdrive.storage.metrics import IoMetrics
from kvdrive.storage.probe import DirectIOWarning, probe_direct

DEFAULT_EXTENT_BYTES = 1 << 30
MAX_RUN_BYTES = 1 << 20  # longest coalesced preadv/pwritev; beyond this, more requests in flight win
assert MAX_RUN_BYTES // 4096 <= native_io.MAX_RUN_SLOTS
DIRECT_MODES = ("auto", "on", "off")
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


class DiskDevice:
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
        if direct not in DIRECT_MODES:
            raise KvdriveError(f"direct must be one of {DIRECT_MODES}, got {direct!r}")
        if not os.path.isdir(path):
            raise KvdriveError(f"disk path {path!r} is not a directory")
        self.path = path
        self.layout = layout
        self.faults = faults or faults_from_env() or NoFaults()
        self.metrics = metrics or IoMetrics()
        sb = layout.slot_bytes
        self.num_slots = budget_bytes // sb
        # NOTE: not capped by the budget: the slot geometry of a persistent pool stays the same
        # whatever budget reopens it (a short budget makes the last extent short instead)
        self.extent_slots = max(1, extent_bytes // sb)
        self.persistent = persist_name is not None
        self._fds: list[int] = []
        self._paths: list[str] = []
        self._free = FreeList(0)
        self._exhausted: str | None = None  # why no further extent can be created
        self._sums = np.zeros(self.num_slots, dtype=np.uint64)
        self._valid = np.zeros(self.num_slots, dtype=bool)
        self._fresh = np.zeros(0, dtype=bool)  # slots of extents created at this open (restore refuses them)
        self.last_write_error: str | None = None  # strerror of the last failed write or extent creation
        self.read_failures = 0  # slot reads that failed after their retry
        self.read_retries = 0  # slot reads tried again (recovered: read_retries - read_failures)
        self._warned_reads = False
        sweep_stale(path)
        if self.persistent:
            self._lock = DirLock.take(os.path.join(path, f"kvdrive-{persist_name}.lock"))
            self._tag = f"kvdrive-{persist_name}"
        else:
            self._lock = DirLock.private(path)
            self._tag = self._lock.tag
        # files of a private device go when it does, closed or not (and at interpreter exit)
        self._cleanup = weakref.finalize(self, _remove_files, self._fds, self._paths, self._lock, not self.persistent)
        try:
            self.direct = self._choose_direct(direct)
            if self.persistent:
                self._reopen()
        except BaseException:
            self._cleanup()
            raise
        self._reads = IoQueue(read_depth, f"{self._tag}-r", self.metrics, "disk_read")
        self._writes = IoQueue(write_depth, f"{self._tag}-w", self.metrics, "disk_write")
        # Native batches run one at a time, each on read_depth (write_depth) threads: the queue
        # depth the disk was probed at (several batches at once put far more reads in flight,
        # where a disk can be slower, not faster).
        self._native_reads = IoQueue(1, f"{self._tag}-nr", self.metrics, "disk_read_batch")
        self._native_writes = IoQueue(1, f"{self._tag}-nw", self.metrics, "disk_write_batch")

    def _choose_direct(self, mode: str) -> bool:
        if mode == "off":
            return False
        probe = probe_direct(self.path, self.faults)
        if probe.ok:
            return True
        if mode == "on":
            raise KvdriveError(f"{self.path}: O_DIRECT refused ({probe.reason}); use another path or direct='auto'")
        warnings.warn(
            f"{self.path}: O_DIRECT refused ({probe.reason}); using buffered I/O with page-cache "
            f"dropping (posix_fadvise DONTNEED), which is slower",
            DirectIOWarning,
            stacklevel=3,
        )
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
        got = self._create(path, n)
        if got == 0:
            return False
        if got < n:  # a short extent is the last one: the next would not start on an extent boundary
            self._exhausted = (
                f"the file system took {got} of {n} slots of the extent {os.path.basename(path)}: "
                f"{self.last_write_error}"
            )
        self._free.grow(got)
        return True

    def _create(self, path: str, n: int) -> int:
        """Create and preallocate the extent ``path`` of ``n`` slots, or of as many as the file
        system still takes (ENOSPC, EFBIG); returns the slots it holds (0: none, ``_exhausted``
        says why) and keeps it open."""
        sb = self.layout.slot_bytes
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if self.direct else os.O_DSYNC)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as err:
            self._refused(f"creating {path} failed: {err.strerror or err}", err)
            return 0
        for want in (n, self._room_slots(n)):
            if want <= 0:
                continue
            try:
                self.faults.before("fallocate", path, 0, want * sb)
                os.posix_fallocate(fd, 0, want * sb)
            except OSError as err:
                self._refused(f"creating a {want * sb} B extent failed: {err.strerror or err}", err)
                if err.errno not in (errno.ENOSPC, errno.EFBIG):
                    break
                continue
            self._fds.append(fd)
            self._paths.append(path)
            return want
        os.close(fd)
        os.unlink(path)
        return 0

    def _room_slots(self, n: int) -> int:
        """Slots (< ``n``) that a new extent may still take on this file system: the free space
        and the process's file-size limit, less one slot of margin for metadata."""
        sb = self.layout.slot_bytes
        try:
            st = os.statvfs(self.path)
            room = st.f_bavail * st.f_frsize
        except OSError:
            return 0
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            room = min(room, limit)
        fit = room // sb - 1
        return fit if fit < n else 0  # room for all of it: the refusal was not about space

    def _refused(self, why: str, err: OSError) -> None:
        self._exhausted = why
        self.last_write_error = err.strerror or str(err)

    # -- persistence (persist_name) ---------------------------------------------------

    def _extent_path(self, n: int) -> str:
        return os.path.join(self.path, f"{self._tag}-{n}.extent")

    def _reopen(self) -> None:
        """Open this name's extents. Nothing is deleted: extents of another extent size or
        beyond the budget are refused (``KvdriveError``) before any file is touched; a missing
        extent between others is created again (its slots are fresh: ``restore`` refuses them);
        a short last extent is extended to the size the budget gives it where it can be."""
        sb, es = self.layout.slot_bytes, self.extent_slots
        pattern = re.compile(rf"^{re.escape(self._tag)}-(\d+)\.extent$")
        sizes = {
            int(m[1]): os.path.getsize(os.path.join(self.path, m[0]))
            for m in map(pattern.match, os.listdir(self.path))
            if m
        }
        if not sizes:
            return
        last = max(sizes)
        for n, size in sorted(sizes.items()):
            if size % sb or size > es * sb or (n < last and size != es * sb):
                raise KvdriveError(
                    f"{self._extent_path(n)} holds {size} B, not extents of {es * sb} B: this "
                    f"directory was made with another extent size (extent_bytes) or slot size; "
                    "reopen it with those, or give this pool another directory"
                )
        need = last * es + sizes[last] // sb
        if need > self.num_slots:
            raise KvdriveError(
                f"{self.path} holds {need * sb / 2**30:.2f} GiB of {self._tag} extents, more than the "
                f"disk budget of {self.num_slots * sb / 2**30:.2f} GiB: reopen it with a budget of at "
                f"least {need * sb / 2**30:.2f} GiB (nothing was deleted)"
            )
        flags = os.O_RDWR | (os.O_DIRECT if self.direct else os.O_DSYNC)
        fresh = []
        for n in range(last + 1):
            path = self._extent_path(n)
            if n not in sizes:  # lost: a fresh extent keeps the slot numbers of those after it
                warnings.warn(f"{path} was missing: created again empty; the chunks it held are gone", stacklevel=4)
                if self._create(path, es) < es:
                    self._exhausted = f"{path} was missing and could not be created again ({self.last_write_error})"
                    return
                fresh.append(n)
                self._free.grow(es)
                continue
            self._fds.append(os.open(path, flags))
            self._paths.append(path)
            slots = sizes[n] // sb
            want = min(es, self.num_slots - n * es) if n == last else es
            if slots < want:
                try:
                    os.posix_fallocate(self._fds[-1], 0, want * sb)
                    slots = want
                except OSError as err:
                    self._refused(f"extending {path} to {want * sb} B failed: {err.strerror or err}", err)
            self._free.grow(slots)
        self._fresh = np.zeros(self._free.capacity, dtype=bool)
        for n in fresh:
            self._fresh[n * es : (n + 1) * es] = True

    def restore(self, slots: list[int], sums: list[int]) -> list[bool]:
        """Mark ``slots`` (of reopened extents) as holding data with checksums ``sums``.
        Returns per slot whether it was restored: False for a slot outside the reopened
        extents, in an extent created again at this open, or named twice (the first claim
        wins; each slot is marked as it is checked)."""
        cap = self._free.capacity
        ok = []
        for s, c in zip(slots, sums):
            good = 0 <= s < cap and not self._valid[s] and not (s < len(self._fresh) and self._fresh[s])
            if good:
                self._valid[s], self._sums[s] = True, c
            ok.append(good)
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
            parts.append(
                (
                    idx.tolist(),
                    self._native_reads.map_shards(lambda req: self._read_native(fn, *req), [(slots[idx], dsts[idx])])[
                        0
                    ][1],
                )
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

    def _read_native(self, fn, slots: np.ndarray, dsts: np.ndarray) -> list[str | None]:
        want = np.ascontiguousarray(self._sums[slots])
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
        """Stop the queues, close the extents and drop the lock; the extents are deleted unless
        the device is persistent (``remove`` overrides)."""
        if not self._cleanup.alive:
            return
        for queue in (self._reads, self._writes, self._native_reads, self._native_writes):
            queue.shutdown()
        self._cleanup.detach()
        _remove_files(self._fds, self._paths, self._lock, not self.persistent if remove is None else remove)


def _remove_files(fds: list[int], paths: list[str], lock: DirLock, remove: bool) -> None:
    """Close (and with ``remove`` delete) a device's extents, then release its lock."""
    for fd, path in zip(fds, paths):
        os.close(fd)
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    fds.clear()
    paths.clear()
    lock.release(unlink=remove)


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
