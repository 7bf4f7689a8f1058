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
a CUDA graph. That path is the ``DeferredReads`` mixin (``deferred.py``).

Evicted arena slots are not reused at once: a step still in flight may read them, so they
wait (``_held``) for the event of the last step committed when they were evicted.
"""

from __future__ import annotations

import functools
from collections import deque

import numpy as np
import torch

from kvdrive.errors import CapacityError, KvdriveError
from kvdrive.tiered.deferred import DeferredReads
from kvdrive.storage.host import HostTier
from kvdrive.tiered.host_kv import HostKV, check_host_room
from kvdrive.storage.layout import GroupLayout
from kvdrive.storage.pool import DiskAddr, DiskPool, PoolPath

# An arena short of slots evicts at least 1/EVICT_SHARE of them at once: choosing victims scans
# the arena (~21K slots a layer at 8K x 64 of SmolLM2 with 7.2 GiB), ~1-2 ms a choice on the
# engine thread (1/64 until stop 17: ~1.5 choices a step at ~90 reads a step). The slots evicted
# ahead of need (up to 3% of a layer's arena) wait free until reads take them.
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


class DiskBackedHostKV(DeferredReads, HostKV):
    may_miss = True

    def __init__(self, layout: GroupLayout, max_seqs: int, max_groups: int, device: torch.device,
                 host_bytes: int, disk: tuple[PoolPath, ...], direct: str = "auto", faults=None):
        super().__init__(layout, max_seqs, max_groups, device)
        if not disk:
            raise KvdriveError("a disk-backed host tier needs at least one disk path (PoolPath)")
        nl = layout.num_layers
        check_host_room(host_bytes, "the host arena in front of the disks")
        self.arenas = [HostTier(layout, host_bytes // nl, pin=device.type == "cuda") for _ in range(nl)]
        self._typed = [layout.as_groups(a.rows) for a in self.arenas]
        self._np_rows = [a.rows.numpy() for a in self.arenas]  # the same memory, for numpy's fancy indexing
        self._bases = np.array([a.rows.data_ptr() for a in self.arenas], dtype=np.uint64)  # disk reads land here
        self.slot_of = np.full((nl, max_seqs, max_groups), -1, dtype=np.int64)  # host slot, -1: not in host
        self._slot_by_flat = self.slot_of.reshape(nl, -1)  # a view: (layer, seq * N + group)
        self.slot_gpu = torch.full((nl, max_seqs, max_groups), -1, dtype=torch.int64, device=device)
        ns = self.arenas[0].num_slots  # the same in every layer
        self.owner = np.full((nl, ns), -1, dtype=np.int64)  # (layer, slot) -> seq*N + group
        self.stamp = np.zeros((nl, ns))
        # Durable disk copy of (layer, seq*N + group): (device, slot), -1 while there is none. A
        # group is durable (may leave host memory) exactly when it has one.
        self.disk_at = np.full((nl, max_seqs * max_groups, 2), -1, dtype=np.int64)
        self.pool = DiskPool.open(list(disk), layout, direct=direct, faults=faults)
        self._writes: deque = deque()  # (layers, flats, (n, 2) disk addrs, future) per step, oldest first
        # LRU stamps: a decode step's uses get ``clock`` (one more each decode step), a prefill's
        # clock - 0.25, placement priorities (``place``) lie below both
        self.clock = 0.0
        self._now = -0.25
        self._last_step = _Done()  # event after the last forward's reads and writes of the arenas
        self._updates: list[np.ndarray] = []  # (4, n) layer, seq, group, slot: slot_gpu changes not yet applied
        self.counts = {"disk_reads": 0, "read_ahead": 0, "disk_writes": 0, "lost": 0, "host_evictions": 0}
        self._ahead: dict[int, tuple] = {}  # layer -> (flats, slots, future): reads in flight
        self._held = [deque() for _ in range(nl)]  # per layer: (event, slots) evicted, free once it completes
        self._selections: deque = deque()  # steps' selections on their way to the host (deferred misses)
        self._deferred: deque = deque()  # a step's deferred reads, all layers: (layers, flats, slots, future)
        self._reading = np.zeros((nl, max_seqs * max_groups), dtype=bool)  # (layer, flat): a deferred read in flight
        # arena slots per layer that reads behind and placement leave free: the groups the next
        # steps open, so ``begin`` never waits for the GPU to free slots
        self.reserve = 2 * max_seqs
        self.prio = np.full((nl, max_seqs * max_groups), -np.inf)  # (layer, flat): placement priority (``place``)
        self.counts.update(deferred=0, deferred_reads=0, host_waits=0, placed_reads=0)

    @property
    def nbytes(self) -> int:
        return sum(a.bytes_capacity for a in self.arenas)

    def words(self, layer):
        return self.arenas[layer].rows.view(torch.int32)

    def typed(self, layer):
        return self._typed[layer]

    def rows(self, layer, slots, groups):
        return self.slot_gpu[layer][slots[:, None], groups]

    # -- capacity ---------------------------------------------------------------------
    def _alloc(self, layer: int, n: int, protect: set[int], wait: bool = True, reserve: int = 0) -> list[int]:
        """``n`` free arena slots of ``layer``, evicting least recently used durable groups not
        in ``protect``. ``wait=False``: as many as are free without waiting (maybe fewer), leaving
        ``reserve`` free (the groups the next steps open: ``begin`` must never wait for the GPU)."""
        arena = self.arenas[layer]
        if n > arena.num_slots:
            raise CapacityError(f"layer {layer}: {n} groups must be in host memory at once, the arena has "
                                f"{arena.num_slots} slots: raise the host budget")
        if arena.num_free >= n + reserve:  # the common case: no event queries, no scans
            return arena.alloc(n)
        while True:
            self._recycle(layer)
            if arena.num_free >= n + reserve:
                return arena.alloc(n)
            short = n + reserve - arena.num_free - sum(len(x) for _, x in self._held[layer])
            if short > 0:  # a batch at a time: each choice scans the whole arena
                victims = self._victims(layer, max(short, arena.num_slots // EVICT_SHARE), protect)
                if len(victims):
                    self._evict(layer, victims)
                    continue
            if not wait:
                return arena.alloc(max(0, arena.num_free - reserve))
            # NOTE: the waits below stall the host until the GPU's queued steps finish; counted
            self.counts["host_waits"] += 1
            if self._held[layer]:
                self._recycle(layer, block=True)  # GPU copies of a step in flight may still read them
            elif self._writes:
                self._reap(wait_one=True)
            else:
                raise CapacityError(f"layer {layer}: host arena of {arena.num_slots} groups is full and no group can "
                                    f"leave (the rest are in use now or not yet on disk): raise the host budget")

    def _victims(self, layer: int, n: int, protect: set[int]) -> np.ndarray:
        """Up to ``n`` arena slots of durable groups not in ``protect``, least recently used first."""
        own = self.owner[layer]
        used = np.nonzero(own >= 0)[0]
        flat = own[used]
        ok = self.disk_at[layer, flat, 1] >= 0
        if protect:
            ok &= ~np.isin(flat, list(protect))
        cand = used[ok]
        if len(cand) > n:  # the n oldest, in no order: O(arena), not a sort of it
            cand = cand[np.argpartition(self.stamp[layer][cand], n - 1)[:n]]
        return cand

    def _recycle(self, layer: int, block: bool = False) -> None:
        """Free the evicted slots whose last possible reader is done (``block``: wait for the oldest)."""
        held = self._held[layer]
        while held and (block or held[0][0].query()):
            event, slots = held.popleft()
            event.synchronize()
            self.arenas[layer].free(slots)
            block = False

    def _evict(self, layer: int, slots: np.ndarray) -> None:
        flat = self.owner[layer][slots]
        s, g = np.divmod(flat, self.n)
        self.slot_of[layer, s, g] = -1
        self._updates.append(np.stack([np.full_like(s, layer), s, g, np.full_like(s, -1)]))
        self.owner[layer][slots] = -1
        self._held[layer].append((self._last_step, slots.tolist()))  # the step in flight may still read them
        self.counts["host_evictions"] += len(slots)

    def _map(self, layer, flat: np.ndarray, slots) -> None:
        """Groups ``flat`` of ``layer`` (one, or one per group) now live in arena ``slots``."""
        s, g = np.divmod(flat, self.n)
        sl = np.asarray(slots, dtype=np.int64)
        lay = np.broadcast_to(np.asarray(layer, dtype=np.int64), sl.shape)
        self.slot_of[lay, s, g] = sl
        self.owner[lay, sl] = flat
        self.stamp[lay, sl] = self._now
        self._updates.append(np.stack([lay, s, g, sl]))

    def _flush(self) -> None:
        """Apply the queued changes of ``slot_gpu`` (the GPU's copy of ``slot_of``) in one pinned
        upload and one scatter, ahead of the next step on the stream; a (layer, seq, group)
        changed twice keeps its last value. Every entry point that maps or evicts ends with it.

        NOTE: one upload per change was ~5 pinned allocations, copies and scatters a decode
        step on the engine thread (H200: ~2.5 ms a step in ``_evict`` and ``_map``)."""
        if not self._updates:
            return
        a = np.concatenate(self._updates, axis=1)
        self._updates.clear()
        key = (a[0] * self.max_seqs + a[1]) * self.n + a[2]
        _, last = np.unique(key[::-1], return_index=True)  # the last change of each entry
        idx = self._up(a[:, len(key) - 1 - last])
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
        self._take_selections()
        self._land_deferred()
        if num_new == 1:
            self.clock += 1
        self._now = self.clock if num_new == 1 else self.clock - 0.25
        g = self.layout.group_tokens
        s_idx = np.repeat(slot_list, [(st + num_new - 1) // g - st // g + 1 for st in starts])
        g_idx = np.concatenate([np.arange(st // g, (st + num_new - 1) // g + 1) for st in starts])
        flat = s_idx * self.n + g_idx
        for layer in range(len(self.arenas)):
            missing = flat[self.slot_of[layer, s_idx, g_idx] < 0]
            if len(missing):
                slots = self._alloc(layer, len(missing), set(flat.tolist()))
                # a group's unwritten tail reads as zeros, never stale data (numpy: torch's index_put
                # of 64 rows took ~3 ms a layer on the engine thread, bench/scripts/deferred_host_path.py)
                self._np_rows[layer][slots] = 0
                self._map(layer, missing, slots)

    def end(self, slot_list, starts, num_new, written):
        self._last_step = written
        g = self.layout.group_tokens
        full = [s * self.n + grp for s, st in zip(slot_list, starts) for grp in range(st // g, (st + num_new) // g)]
        if full:  # every layer's filled groups in one write batch, after the step's writes land
            nl = len(self.arenas)
            layers = np.repeat(np.arange(nl), len(full))
            flat = np.tile(np.asarray(full, dtype=np.int64), nl)
            slots = self._slot_by_flat[layers, flat]
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
            self.disk_at[layers[ok], flat[ok]] = addrs[ok]
            if not ok.all():  # the host copy stays (not durable, so never evicted)
                self.pool.free([DiskAddr(int(d), int(x)) for d, x in addrs[~ok]])

    # -- read path --------------------------------------------------------------------
    def _addrs(self, layer: int, flat: np.ndarray) -> list[DiskAddr]:
        return [DiskAddr(int(d), int(x)) for d, x in self.disk_at[layer, flat]]

    def _read(self, layers, flat: np.ndarray, slots) -> object:
        """Read the disk copies of groups ``flat`` of ``layers`` (one, or one per group) into
        their arena ``slots``: one batch over all devices."""
        at = self.disk_at[layers, flat]  # (n, 2): device, disk slot
        dsts = self._bases[layers] + np.asarray(slots, dtype=np.uint64) * np.uint64(self.layout.slot_bytes)
        return self.pool.read_to(at[:, 0], at[:, 1], dsts)

    def _submit(self, layer: int, flat: np.ndarray, protect: set[int]):
        """Host slots for the durable groups ``flat`` and their disk reads, all devices at once."""
        slots = self._alloc(layer, len(flat), protect)
        return slots, self._read(layer, flat, slots)

    def _adopt(self, layer: int, flat: np.ndarray, slots: list[int], ok: np.ndarray) -> np.ndarray:
        """Map the groups whose read succeeded (``ok``), free the slots of the others; returns ``ok``."""
        self.arenas[layer].free([x for x, good in zip(slots, ok) if not good])
        if ok.any():
            self._map(layer, flat[ok], [x for x, good in zip(slots, ok) if good])
        return ok

    @_flushing
    def read_ahead(self, layer, slot_list, groups, need):
        self._land(layer)
        s = np.asarray(slot_list, dtype=np.int64)[:, None].repeat(groups.shape[1], 1)
        flat_all = s * self.n + groups
        want = need.astype(bool) & (self.slot_of[layer, s, groups] < 0)
        flat = np.unique(flat_all[want])
        flat = flat[self.disk_at[layer, flat, 1] >= 0]
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
        flat_all, host = self._touch(layer, slot_list, groups, (need if keep is None else keep).astype(bool))
        want = need & (host < 0)
        if not want.any():
            return failed
        flat = np.unique(flat_all[want])
        on_disk = self.disk_at[layer, flat, 1] >= 0
        ok = np.zeros(len(flat), dtype=bool)
        if on_disk.any():
            slots, fut = self._submit(layer, flat[on_disk], set(flat_all[need].tolist()))
            ok[on_disk] = self._adopt(layer, flat[on_disk], slots, fut.ok())
        self.counts["disk_reads"] += int(ok.sum())
        if not ok.all():
            lost = flat[~ok]
            self._lose(layer, lost)
            failed = want & np.isin(flat_all, lost)
            self.counts["lost"] += int(failed.sum())
        return failed

    def _touch(self, layer: int, slot_list, groups: np.ndarray, selected: np.ndarray):
        """Stamp the ``selected`` of ``groups`` (B, P) of ``slot_list`` that are in the arena as
        used now (LRU); returns their flat ids seq * N + group and host slots (-1: not in host)."""
        s = np.asarray(slot_list, dtype=np.int64)[:, None].repeat(groups.shape[1], 1)
        host = self.slot_of[layer, s, groups]
        self.stamp[layer][host[(host >= 0) & selected]] = self._now
        return s * self.n + groups, host

    # -- initial placement --------------------------------------------------------------
    @_flushing
    def place(self, layer, slot_list, importance, counts):
        """Initial placement by importance (``TieredPrefill.place``), one layer of newly prefilled
        sequences. Each of their groups gets a priority by its rank within its sequence
        (``prio``): in (clock - 1, clock - 0.5), below what a prefill or a decode step touches
        now, the most important highest, so sequences placed at the same clock compare by rank.
        Their arena slots are restamped with it, and every absent durable group (of any placed
        sequence) whose priority outranks the arena's least recently used is read back in its
        place, synchronously (prefill time). Without it the arena holds what the prefills
        touched last: whole sequences, the first ones gone (``bench/scripts/arena_policy_sim.py``
        compares the two). Returns the groups read."""
        counts = np.asarray(counts, dtype=np.int64)
        if counts.sum():
            rows = np.repeat(np.arange(len(counts)), counts)
            g = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)  # group within its sequence
            flat = np.asarray(slot_list, dtype=np.int64)[rows] * self.n + g
            order = np.lexsort((importance[rows, g], rows))  # by sequence, least important first
            prio = np.empty(len(rows))
            prio[order] = self.clock - 1 + 0.5 * (g + 1) / (counts[rows] + 1)
            self.prio[layer, flat] = prio
            host = self._slot_by_flat[layer, flat]
            self.stamp[layer, host[host >= 0]] = prio[host >= 0]
        prio = self.prio[layer]
        cand = np.flatnonzero((self._slot_by_flat[layer] < 0) & (self.disk_at[layer, :, 1] >= 0)
                              & ~self._reading[layer] & (prio > -np.inf))
        if not len(cand):
            return 0
        cand = cand[np.argsort(-prio[cand], kind="stable")]
        # the free slots first, then as many as outrank the durable groups LRU would evict for them
        free = max(0, self.arenas[layer].num_free - self.reserve)
        own = self.owner[layer]
        used = np.flatnonzero(own >= 0)
        lru = np.sort(self.stamp[layer, used[self.disk_at[layer, own[used], 1] >= 0]])
        rest = prio[cand[free:]]
        m = min(len(rest), len(lru))
        take = cand[: free + int(np.count_nonzero(rest[:m] > lru[:m]))]  # both monotone: a prefix
        if not len(take):
            return 0
        slots = np.asarray(self._alloc(layer, len(take), set()), dtype=np.int64)
        ok = self._adopt(layer, take, slots.tolist(), self._read(layer, take, slots).ok())
        self.stamp[layer, slots[ok]] = prio[take[ok]]
        if not ok.all():  # its disk copy is bad: the group is gone, as after a failed decode read
            self._lose(layer, take[~ok])
            self.counts["lost"] += int((~ok).sum())
        self.counts["placed_reads"] += int(ok.sum())
        return int(ok.sum())

    def _lose(self, layer: int, lost: np.ndarray) -> None:
        """Groups whose disk copy failed its read: never read a bad copy again (the group is gone)."""
        bad = lost[self.disk_at[layer, lost, 1] >= 0]
        self.pool.free(self._addrs(layer, bad))
        self.disk_at[layer, lost] = -1

    def _drain(self) -> None:
        """Every read and selection in flight landed (before slots are freed or files closed)."""
        while self._selections:
            self._selections[0][4].synchronize()
            self._take_selections()
        self._land_deferred(block=True)
        for layer in list(self._ahead):
            self._land(layer)

    def gather_pairs(self, layer, slots, groups):
        if groups:
            g = np.asarray(groups, dtype=np.int64)[:, None]
            failed = self.resolve(layer, list(slots), g, np.ones_like(g, dtype=bool))
            if failed.any():
                bad = sorted({int(x) for x in np.asarray(slots)[failed[:, 0]]})
                raise KvdriveError(f"layer {layer}: {int(failed.sum())} KV groups of sequence slots {bad} could not be "
                                   "read back (I/O error or checksum); those sequences must be prefilled again")
        return super().gather_pairs(layer, slots, groups)

    def clear(self, slot):
        self._last_step.synchronize()
        self._drain()
        self._flush()
        self._reap(wait_all=True)
        for layer, arena in enumerate(self.arenas):
            held = self.slot_of[layer, slot]
            used = held[held >= 0]
            if len(used):
                self.owner[layer][used] = -1
                arena.free(used.tolist())
            self.slot_of[layer, slot] = -1
            self.slot_gpu[layer, slot] = -1
            span = np.arange(slot * self.n, (slot + 1) * self.n)
            self.prio[layer, span] = -np.inf
            self.pool.free(self._addrs(layer, span[self.disk_at[layer, span, 1] >= 0]))
            self.disk_at[layer, span] = -1

    def reset_counts(self) -> None:
        self.counts = dict.fromkeys(self.counts, 0)

    def stats(self) -> dict:
        return dict(self.counts, disk_bytes=self.pool.bytes_used(),
                    host_resident_groups=int(sum(a.num_slots - a.num_free for a in self.arenas)))

    def close(self) -> None:
        self._drain()
        self._reap(wait_all=True)
        self.pool.close()
