"""``DiskBackedHostKV``: the tiered cache's groups on the disk pool, behind a pinned host arena.

Per layer a pinned ``HostTier`` arena of fewer slots than groups, and the disk pool (O_DIRECT
extents, xxh3 per slot) holding every full group, written behind as groups fill. Host slots
are evicted LRU among groups already durable on disk. A decode step whose selection needs
disk-only groups pays one host sync per layer (``resolve``): they are read into the arena,
then fetched like host hits; the groups a layer's predicted selection needs from disk are
read ahead (``read_ahead``) while the layer before computes, and adopted by that layer's
``resolve``. A read that fails its checksum or I/O is never served: the group is dropped
from that step's attention and counted (``lost``).

Deferred misses (``TieredConfig.disk_misses="defer"``) take the host off the step's path:
the GPU serves what the GPU cache and the arena hold and leaves the disk-only groups out of
that step's attention; the step's selections reach the host asynchronously
(``take_selections``), which stamps the arena's LRU and reads the groups that were left out,
to be mapped before a later step (``begin``). No host sync per layer, so such a step can be
a CUDA graph. That path is the ``DeferredReads`` component (``deferred.py``).

The bookkeeping (which slot holds which group, the LRU clock, free and held slots, durable
copies) is the torch-free ``ArenaIndex`` (``index``); this class moves the bytes: arena
memory, disk reads and writes, and ``slot_gpu``, the device's copy of the index's map.
Evicted arena slots are not reused at once: a step still in flight may read them, so they
are held until the event of the last step committed when they were evicted.

With a compressed ``layout.kv_dtype`` arena and disk slots hold stored groups (slots of the
stored bytes, rounded up to 4 KiB: more of them in the same ``host_bytes``); the open group
keeps an arena slot, which its seal fills before the group is written behind, while its
tokens go to the exact open row and fetches read it there (``HostKV.rows``).
"""

from __future__ import annotations

import functools
from collections import deque

import numpy as np
import torch

from kvdrive.cache.base import TierBytes
from kvdrive.errors import CapacityError, KvdriveError
from kvdrive.storage.host import HostTier
from kvdrive.storage.layout import GroupLayout
from kvdrive.storage.pool import DiskAddr, DiskPool, PoolPath
from kvdrive.tiered.arena_index import ArenaIndex
from kvdrive.tiered.deferred import DeferredReads
from kvdrive.tiered.host_kv import HostKV, check_host_room

# An arena short of slots evicts at least 1/EVICT_SHARE of them at once: choosing victims scans
# the whole arena on the engine thread, so a batch of victims per scan keeps scans rare. The
# slots evicted ahead of need wait free until reads take them.
EVICT_SHARE = 32


class _Done:
    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _flushing(method):
    """Run ``method``, then apply the ``slot_gpu`` changes it queued (``_flush``)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        finally:
            self._flush()

    return run


class DiskBackedHostKV(HostKV):
    may_miss = True

    def __init__(
        self,
        layout: GroupLayout,
        max_seqs: int,
        max_groups: int,
        device: torch.device,
        host_bytes: int,
        disk: tuple[PoolPath, ...],
        direct: str = "auto",
        faults=None,
    ):
        super().__init__(layout, max_seqs, max_groups, device)
        if not disk:
            raise KvdriveError("a disk-backed host tier needs at least one disk path (PoolPath)")
        nl = layout.num_layers
        check_host_room(host_bytes + (self.opened.nbytes if self.opened else 0), "the host arena in front of the disks")
        self.arenas = [HostTier(layout, host_bytes // nl, pin=device.type == "cuda") for _ in range(nl)]
        self._typed = [] if self.compressed else [layout.as_groups(a.rows) for a in self.arenas]
        self.raw_from = self.arenas[0].num_slots  # compressed: open rows are read past the arena's slots
        self._np_rows = [a.rows.numpy() for a in self.arenas]  # the same memory, for numpy's fancy indexing
        self._bases = np.array([a.rows.data_ptr() for a in self.arenas], dtype=np.uint64)  # disk reads land here
        self.index = ArenaIndex(nl, max_seqs, max_groups, self.arenas[0].num_slots)  # the same slots every layer
        self.slot_gpu = torch.full((nl, max_seqs, max_groups), -1, dtype=torch.int64, device=device)
        self.pool = DiskPool.open(list(disk), layout, direct=direct, faults=faults)
        self._writes: deque = deque()  # (layers, flats, (n, 2) disk addrs, future) per step, oldest first
        self._last_step = _Done()  # event after the last forward's reads and writes of the arenas
        self.counts = {
            "disk_reads": 0,
            "read_ahead": 0,
            "disk_writes": 0,
            "lost": 0,
            "host_evictions": 0,
            "host_waits": 0,
            "placed_reads": 0,
        }
        self._ahead: dict[int, tuple] = {}  # layer -> (flats, slots, future): reads in flight
        # arena slots per layer that reads behind and placement leave free: the groups the next
        # steps open, so ``begin`` never waits for the GPU to free slots
        self.reserve = 2 * max_seqs
        self.deferred = DeferredReads(self.index, self, self.reserve)

    @property
    def nbytes(self) -> int:
        return sum(a.bytes_capacity for a in self.arenas) + (self.opened.nbytes if self.opened else 0)

    def words(self, layer):
        return self.arenas[layer].rows.view(torch.int32)

    def stored_rows(self, layer):
        return self.arenas[layer].rows

    def typed(self, layer):
        return self._typed[layer]

    def group_rows(self, layer, slots, groups):
        return self.slot_gpu[layer][slots[:, None], groups]

    # -- capacity ---------------------------------------------------------------------
    def alloc(self, layer: int, n: int, protect: set[int], wait: bool = True, reserve: int = 0) -> list[int]:
        """``n`` free arena slots of ``layer``, evicting least recently used durable groups not
        in ``protect``. ``wait=False``: as many as are free without waiting (maybe fewer), leaving
        ``reserve`` free (the groups the next steps open: ``begin`` must never wait for the GPU)."""
        index = self.index
        if n > index.num_slots:
            raise CapacityError(
                f"layer {layer}: {n} groups must be in host memory at once, the arena has "
                f"{index.num_slots} slots: raise the host budget"
            )
        if index.num_free(layer) >= n + reserve:  # the common case: no event queries, no scans
            return index.take(layer, n)
        while True:
            index.recycle(layer)
            if index.num_free(layer) >= n + reserve:
                return index.take(layer, n)
            short = n + reserve - index.num_free(layer) - index.num_held(layer)
            if short > 0:  # a batch at a time: each choice scans the whole arena
                victims = index.victims(layer, max(short, index.num_slots // EVICT_SHARE), protect)
                if len(victims):
                    index.evict(layer, victims, self._last_step)  # the step in flight may still read them
                    self.counts["host_evictions"] += len(victims)
                    continue
            if not wait:
                return index.take(layer, max(0, index.num_free(layer) - reserve))
            # NOTE: the waits below stall the host until the GPU's queued steps finish; counted
            self.counts["host_waits"] += 1
            if index.held[layer]:
                index.recycle(layer, block=True)  # GPU copies of a step in flight may still read them
            elif self._writes:
                self._reap(wait_one=True)
            else:
                raise CapacityError(
                    f"layer {layer}: host arena of {index.num_slots} groups is full and no group can "
                    f"leave (the rest are in use now or not yet on disk): raise the host budget"
                )

    def _flush(self) -> None:
        """Apply the index's queued map changes to ``slot_gpu`` in one pinned upload and one
        scatter, ahead of the next step on the stream. Every entry point that maps or evicts
        ends with it (one upload per change would cost the engine thread several pinned
        allocations, copies and scatters a step)."""
        changes = self.index.take_changes()
        if changes is None:
            return
        idx = self._up(changes)
        self.slot_gpu[idx[0], idx[1], idx[2]] = idx[3]

    def _up(self, a: np.ndarray) -> torch.Tensor:
        """``a`` on the device without waiting for the GPU: from pinned memory (a pageable copy
        would block the host until the step in flight ends, e.g. while a graph replays)."""
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    # -- write path -------------------------------------------------------------------
    @_flushing
    def begin(self, slot_list, starts, num_new):
        self.deferred.collect()
        self.deferred.land()
        self.index.begin(num_new)
        g = self.layout.group_tokens
        s_idx = np.repeat(slot_list, [(st + num_new - 1) // g - st // g + 1 for st in starts])
        g_idx = np.concatenate([np.arange(st // g, (st + num_new - 1) // g + 1) for st in starts])
        flat = s_idx * self.n + g_idx
        for layer in range(len(self.arenas)):
            missing = flat[self.index.slot_of[layer, s_idx, g_idx] < 0]
            if len(missing):
                slots = self.alloc(layer, len(missing), set(flat.tolist()))
                # a group's unwritten tail reads as zeros, never stale data (numpy: torch's index_put
                # is slower on the engine thread)
                self._np_rows[layer][slots] = 0
                self.index.map(layer, missing, slots)
        self._open(slot_list, starts, num_new)

    def end(self, slot_list, starts, num_new, written):
        self._last_step = written
        g = self.layout.group_tokens
        full = [s * self.n + grp for s, st in zip(slot_list, starts) for grp in range(st // g, (st + num_new) // g)]
        if full:  # every layer's filled groups in one write batch, after the step's writes land
            nl = len(self.arenas)
            layers = np.repeat(np.arange(nl), len(full))
            flat = np.tile(np.asarray(full, dtype=np.int64), nl)
            slots = self.index.by_flat[layers, flat]
            addrs = np.array(self.pool.alloc(len(flat)), dtype=np.int64).reshape(-1, 2)
            srcs = self._bases[layers] + slots.astype(np.uint64) * np.uint64(self.layout.slot_bytes)
            fut = self.pool.write_from(addrs[:, 0], addrs[:, 1], srcs, before=written.synchronize)
            self._writes.append((layers, flat, addrs, fut))
            self.counts["disk_writes"] += len(flat)
        self._reap()

    def _reap(self, wait_all: bool = False, wait_one: bool = False) -> None:
        while self._writes:
            layers, flat, addrs, fut = self._writes[0]
            if not (wait_all or wait_one or fut.done()):
                return
            self._writes.popleft()
            wait_one = False
            ok = fut.ok()
            self.index.disk_at[layers[ok], flat[ok]] = addrs[ok]
            if not ok.all():  # the host copy stays (not durable, so never evicted)
                self.pool.free([DiskAddr(int(d), int(x)) for d, x in addrs[~ok]])

    # -- read path --------------------------------------------------------------------
    def _addrs(self, at: np.ndarray) -> list[DiskAddr]:
        return [DiskAddr(int(d), int(x)) for d, x in at]

    def read(self, layers, flat: np.ndarray, slots) -> object:
        """Read the disk copies of groups ``flat`` of ``layers`` (one, or one per group) into
        their arena ``slots``: one batch over all devices."""
        at = self.index.disk_at[layers, flat]  # (n, 2): device, disk slot
        dsts = self._bases[layers] + np.asarray(slots, dtype=np.uint64) * np.uint64(self.layout.slot_bytes)
        return self.pool.read_to(at[:, 0], at[:, 1], dsts)

    def _submit(self, layer: int, flat: np.ndarray, protect: set[int]):
        """Host slots for the durable groups ``flat`` and their disk reads, all devices at once."""
        slots = self.alloc(layer, len(flat), protect)
        return slots, self.read(layer, flat, slots)

    def _adopt(self, layer: int, flat: np.ndarray, slots: list[int], ok: np.ndarray) -> np.ndarray:
        """Map the groups whose read succeeded (``ok``), free the slots of the others; returns ``ok``."""
        self.index.release(layer, [x for x, good in zip(slots, ok) if not good])
        if ok.any():
            self.index.map(layer, flat[ok], [x for x, good in zip(slots, ok) if good])
        return ok

    @_flushing
    def read_ahead(self, layer, slot_list, groups, need):
        self._land(layer)
        s = np.asarray(slot_list, dtype=np.int64)[:, None].repeat(groups.shape[1], 1)
        flat_all = s * self.n + groups
        want = need.astype(bool) & (self.index.slot_of[layer, s, groups] < 0)
        flat = np.unique(flat_all[want])
        flat = flat[self.index.disk_at[layer, flat, 1] >= 0]
        if not len(flat):
            return
        try:
            slots, fut = self._submit(layer, flat, set(flat_all[need.astype(bool)].tolist()))
        except CapacityError:
            return  # the arena cannot take them now: the synchronous path will
        self._ahead[layer] = (flat, slots, fut)

    def _land(self, layer: int) -> None:
        """Adopt the read-ahead of ``layer`` (waits for it); failed reads are left to ``resolve``."""
        pending = self._ahead.pop(layer, None)
        if pending is not None:
            flat, slots, fut = pending
            self.counts["read_ahead"] += int(self._adopt(layer, flat, slots, fut.ok()).sum())

    @_flushing
    def resolve(self, layer, slot_list, groups, need, keep=None):
        self._land(layer)
        failed = np.zeros_like(need)
        # LRU over what the step selects, GPU-cache hits included: a group the GPU cache holds
        # stays warm here too, so when that cache evicts it a later pick reads host, not disk
        flat_all, host = self.index.touch(layer, slot_list, groups, (need if keep is None else keep).astype(bool))
        want = need & (host < 0)
        if not want.any():
            return failed
        flat = np.unique(flat_all[want])
        on_disk = self.index.disk_at[layer, flat, 1] >= 0
        ok = np.zeros(len(flat), dtype=bool)
        if on_disk.any():
            slots, fut = self._submit(layer, flat[on_disk], set(flat_all[need].tolist()))
            ok[on_disk] = self._adopt(layer, flat[on_disk], slots, fut.ok())
        self.counts["disk_reads"] += int(ok.sum())
        if not ok.all():
            lost = flat[~ok]
            self.lose(layer, lost)
            failed = want & np.isin(flat_all, lost)
            self.counts["lost"] += int(failed.sum())
        return failed

    def take_selections(self, slot_list, layers: list[int], groups: torch.Tensor, flags: torch.Tensor, event) -> None:
        """A decode step's selections on their way to the host (``DeferredReads.take``)."""
        self.deferred.take(slot_list, layers, groups, flags, event)

    # -- initial placement --------------------------------------------------------------
    @_flushing
    def place(self, layer, slot_list, importance, counts):
        """Initial placement by importance (``TieredSparseKVCache.place``), one layer of newly
        prefilled sequences. Each of their groups gets a priority by its rank within its sequence
        (``ArenaIndex.prioritize``), below what a prefill or a decode step touches now, so
        sequences placed at the same clock compare by rank. Their arena slots are restamped with
        it, and every absent durable group (of any placed sequence) whose priority outranks the
        arena's least recently used is read back in its place, synchronously (prefill time).
        Without it the arena holds what the prefills touched last: whole sequences, the first
        ones gone (``bench/scripts/arena_policy_sim.py`` compares the two). Returns the groups read."""
        index = self.index
        index.prioritize(layer, slot_list, importance, counts)
        take = index.to_place(layer, self.reserve)
        if not len(take):
            return 0
        slots = np.asarray(self.alloc(layer, len(take), set()), dtype=np.int64)
        ok = self._adopt(layer, take, slots.tolist(), self.read(layer, take, slots).ok())
        index.stamp[layer, slots[ok]] = index.prio[layer, take[ok]]
        if not ok.all():  # its disk copy is bad: the group is gone, as after a failed decode read
            self.lose(layer, take[~ok])
            self.counts["lost"] += int((~ok).sum())
        self.counts["placed_reads"] += int(ok.sum())
        return int(ok.sum())

    def lose(self, layer: int, lost: np.ndarray) -> None:
        """Groups whose disk copy failed its read: never read a bad copy again (the group is gone)."""
        at = self.index.disk_at[layer, lost]
        self.pool.free(self._addrs(at[at[:, 1] >= 0]))
        self.index.disk_at[layer, lost] = -1

    def drain(self) -> None:
        """Every read and selection in flight landed (before slots are freed or files closed)."""
        self.deferred.drain()
        for layer in list(self._ahead):
            self._land(layer)

    def gather_pairs(self, layer, slots, groups):
        if groups:
            g = np.asarray(groups, dtype=np.int64)[:, None]
            failed = self.resolve(layer, list(slots), g, np.ones_like(g, dtype=bool))
            if failed.any():
                bad = sorted({int(x) for x in np.asarray(slots)[failed[:, 0]]})
                raise KvdriveError(
                    f"layer {layer}: {int(failed.sum())} KV groups of sequence slots {bad} could not be "
                    "read back (I/O error or checksum); those sequences must be prefilled again"
                )
        return super().gather_pairs(layer, slots, groups)

    def clear(self, slot):
        self._last_step.synchronize()
        self.drain()
        self._flush()
        self._reap(wait_all=True)
        for at in self.index.clear(slot):
            self.pool.free(self._addrs(at))
        self.slot_gpu[:, slot] = -1

    def reset_counts(self) -> None:
        self.counts = dict.fromkeys(self.counts, 0)
        self.deferred.reset_counts()

    def stats(self) -> dict:
        c, d = self.counts, self.deferred.counts
        return {
            "disk_reads": c["disk_reads"],
            "read_ahead": c["read_ahead"],
            "disk_writes": c["disk_writes"],
            "lost": c["lost"] + d["lost"],
            "host_evictions": c["host_evictions"],
            "deferred": d["deferred"],
            "deferred_reads": d["deferred_reads"],
            "host_waits": c["host_waits"],
            "placed_reads": c["placed_reads"],
            "disk_bytes": self.pool.bytes_used(),
            "host_resident_groups": self.index.resident(),
            "bytes_disk_read": (c["disk_reads"] + c["read_ahead"] + c["placed_reads"] + d["deferred_reads"])
            * self.layout.slot_bytes,
            "bytes_disk_written": c["disk_writes"] * self.layout.slot_bytes,
        }

    def tier_bytes(self, groups: int) -> dict[str, TierBytes]:
        """The arena's resident groups, and the disk pool's slots in use, against their sizes."""
        return {
            "host": TierBytes(self.index.resident() * self.layout.slot_bytes, self.nbytes),
            "disk": TierBytes(self.pool.bytes_used(), self.pool.bytes_capacity()),
        }

    def close(self) -> None:
        self.drain()
        self._reap(wait_all=True)
        self.pool.close()
