"""Extent files: one SSD path as preallocated files of fixed slots, and what each slot holds.

``ExtentFiles`` owns the extent files under one directory. Each extent is ``extent_bytes``
(a whole number of slots), created when the previous ones are full and preallocated with
``posix_fallocate``, so the byte budget is enforced on *physical* blocks (``st_blocks``),
and a full file system surfaces as ``CapacityError`` when an extent is created, never
mid-write. No file per group. Every extent is ``extent_bytes`` except the last, which may
be shorter (a budget that is not a multiple of it, or a file system that took only part of
an extent: then the device stops growing there).

The files are opened O_DIRECT when the path accepts it (probed once); otherwise with a loud
``DirectIOWarning`` they are opened O_DSYNC, for buffered I/O that drops its pages.

Slots: ``alloc``/``free`` run on the engine thread. ``_valid[s]`` says slot ``s`` holds data
whose xxh3_64 is ``_sums[s]``: set when a write to it completes (the I/O path) or by
``restore``, cleared by ``free``; a slot that is not valid is never read back as data.

Ownership (``dir_lock``): a device locks its files for its lifetime. A private device
(no ``persist_name``) names them after a fresh per-process lock and deletes them on
``close`` or when it is garbage collected or the interpreter exits; every device deletes,
at open, the files of private owners that died in its directory (kill -9). With
``persist_name`` the extents are named ``kvdrive-<persist_name>-<n>.extent`` under the lock
``kvdrive-<persist_name>.lock`` (a second owner is refused: ``DirectoryInUse``), reopened
by the next device of that name and kept by ``close()``; the owner of the slot index (the
prefix pool) hands back live slots and their checksums with ``restore``. Reopening never
deletes: extents that do not fit the budget or the extent size are refused before anything
is touched; a missing extent between others is created again, empty.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import warnings
import weakref

import numpy as np

from kvdrive.errors import CapacityError, KvdriveError
from kvdrive.storage.dir_lock import DirLock, sweep_stale
from kvdrive.storage.faults import from_env as faults_from_env
from kvdrive.storage.io_buffers import FreeList
from kvdrive.storage.io_engine import IoFaults, NoFaults
from kvdrive.storage.layout import GroupLayout
from kvdrive.storage.probe import DirectIOWarning, probe_direct

DEFAULT_EXTENT_BYTES = 1 << 30
DIRECT_MODES = ("auto", "on", "off")


class ExtentFiles:
    """The slots of one path, in extent files, and the checksum of what each slot holds."""

    def __init__(
        self,
        path: str,
        layout: GroupLayout,
        budget_bytes: int,
        *,
        direct: str = "auto",
        extent_bytes: int = DEFAULT_EXTENT_BYTES,
        faults: IoFaults | None = None,
        persist_name: str | None = None,
    ):
        if direct not in DIRECT_MODES:
            raise KvdriveError(f"direct must be one of {DIRECT_MODES}, got {direct!r}")
        if not os.path.isdir(path):
            raise KvdriveError(f"disk path {path!r} is not a directory")
        self.path = path
        self.layout = layout
        self.faults = faults or faults_from_env() or NoFaults()
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
            stacklevel=4,  # the caller of DiskDevice(), past both __init__s
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
                warnings.warn(f"{path} was missing: created again empty; the chunks it held are gone", stacklevel=5)
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

    def _where(self, slot: int) -> tuple[int, str, int]:
        e, i = divmod(slot, self.extent_slots)
        return self._fds[e], self._paths[e], i * self.layout.slot_bytes

    def locate(self, slot: int) -> tuple[str, int]:
        """(extent file, byte offset) of ``slot``: for tools that read the files another way."""
        _, path, off = self._where(slot)
        return path, off

    def sync(self) -> None:
        """``fdatasync`` every extent: completed writes reach stable storage before an index names them."""
        for fd in self._fds:
            os.fdatasync(fd)

    def close(self, remove: bool | None = None) -> None:
        """Close the extents and drop the lock; the extents are deleted unless the device is
        persistent (``remove`` overrides)."""
        if not self._cleanup.alive:
            return
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
