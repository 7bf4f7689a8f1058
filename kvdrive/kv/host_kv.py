"""Where the tiered cache keeps every group: all of it in pinned host memory, or a pinned
host arena in front of the disk pool.

``HostKV`` is what ``TieredSparseKVCache`` reads misses from. ``rows`` maps (sequence slot,
group) to a row of the layer's host pool on the device (-1: on disk only), so the GPU
fetch kernel needs no host work. Two implementations:

* ``FullHostKV``: one pinned pool per layer with a row for every group of every
  sequence slot (row = slot * N + group). Nothing can miss.
* ``DiskBackedHostKV``: per layer a pinned ``HostTier`` arena of fewer slots, and the
  disk pool (O_DIRECT extents, xxh3 per slot) holding every full group, written behind
  as groups fill. Host slots are evicted LRU among groups already durable on disk. A
  decode step whose selection needs disk-only groups pays one host sync per layer
  (``resolve``): they are read into the arena, then fetched like host hits; the groups a
  layer's predicted selection needs from disk are read ahead (``read_ahead``) while the
  layer before computes, and adopted by that layer's ``resolve``. A read that
  fails its checksum or I/O is never served: the group is dropped from that step's
  attention and counted (``lost``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque

import numpy as np
import torch

from kvdrive.errors import CapacityError, KvdriveError
from kvdrive.kv import tier_ops
from kvdrive.kv.host import HostTier
from kvdrive.kv.layout import GroupLayout
from kvdrive.kv.pool import DiskAddr, DiskPool, PoolPath

HOST_HEADROOM = 2 << 30  # bytes of host memory left to everything else


def host_room() -> int | None:
    """Host memory that pinned KV may take now (MemAvailable minus headroom); None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return max(avail - HOST_HEADROOM, 0)


def check_host_room(nbytes: int, what: str) -> None:
    """Refuse up front a pinned allocation the machine cannot hold (pinning it would swap or
    be killed), with the fix; admission of a batch goes through this before any allocation."""
    room = host_room()
    if room is None:
        return  # not Linux: nothing to check against
    if nbytes > room:
        raise CapacityError(f"{what} needs {nbytes / 2**30:.1f} GiB of pinned host memory, "
                            f"{room / 2**30:.1f} GiB is available: lower the batch or the "
                            "maximum length, or keep the KV on disk (--disk DIR with a smaller --host-gib)")


class HostKV(ABC):
    may_miss: bool = False  # True: ``rows`` can return -1 and ``resolve`` must run before a fetch
    affine_rows: bool = False  # True: ``rows`` is slot * n + group in every layer (never -1)

    def __init__(self, layout: GroupLayout, max_seqs: int, max_groups: int, device: torch.device):
        self.layout, self.max_seqs, self.n, self.device = layout, max_seqs, max_groups, device
        self.group_words = layout.group_words

    @abstractmethod
    def words(self, layer: int) -> torch.Tensor:
        """The layer's host pool as int32 word rows (source of the fetch kernel)."""

    @abstractmethod
    def typed(self, layer: int) -> torch.Tensor:
        """The layer's host pool as (R, 2, H_kv, G, D) (rows may be padded)."""

    @abstractmethod
    def rows(self, layer: int, slots: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """slots (B,), groups (B, P) int64 on the device -> host rows (B, P) int64, -1 if on disk only."""

    def begin(self, slot_list: list[int], starts: tuple[int, ...], num_new: int) -> None:
        """Before a forward: every group the new tokens land in has a host row."""

    def end(self, slot_list: list[int], starts: tuple[int, ...], num_new: int, written) -> None:
        """After a forward (``written``: an event after its token writes): groups that filled go to disk."""

    def resolve(self, layer: int, slot_list: list[int], groups: np.ndarray, need: np.ndarray,
                keep: np.ndarray | None = None) -> np.ndarray:
        """Bring ``groups`` (B, P) where ``need`` into host rows; returns the (B, P) mask that failed.
        ``keep`` (B, P): every group this step selects, GPU-cache hits too (default ``need``); a
        host tier that evicts uses it to keep them."""
        return np.zeros_like(need)

    def read_ahead(self, layer: int, slot_list: list[int], groups: np.ndarray, need: np.ndarray) -> None:
        """Start reading ``groups`` (B, P) where ``need`` into host rows, without waiting; the next
        ``resolve`` of ``layer`` adopts what arrived."""

    def clear(self, slot: int) -> None:
        """A sequence slot starts over."""

    def put(self, layer: int, slot: int, first: int, groups: torch.Tensor) -> None:
        """Whole groups ``first ..`` of one sequence from the device (n, 2, H_kv, G, D) into their
        host rows (a prefill: row-sized copies, not one 2 x D-element write per token)."""
        rows = self.rows(layer, torch.tensor([slot], device=self.device),
                         torch.arange(first, first + groups.shape[0], device=self.device)[None])[0]
        tier_ops.fetch_rows(self.layout.as_words(groups), torch.arange(groups.shape[0], device=groups.device),
                            self.words(layer), rows, self.group_words)

    def gather(self, layer: int, slot: int, groups: list[int]) -> torch.Tensor:
        """Groups of one sequence, copied to the device: (n, 2, H_kv, G, D)."""
        return self.gather_pairs(layer, [slot] * len(groups), groups)

    def gather_pairs(self, layer: int, slots: list[int], groups: list[int]) -> torch.Tensor:
        """Group ``groups[i]`` of sequence slot ``slots[i]`` for every i, copied to the device
        in one kernel: (n, 2, H_kv, G, D) (the groups a decode step completed, batch-wide)."""
        out = torch.empty(len(groups), *self.layout.slot_shape, device=self.device, dtype=self.layout.dtype)
        if groups:
            g = torch.tensor(groups, device=self.device)
            src = self.rows(layer, torch.tensor(slots, device=self.device), g[:, None])[:, 0]
            tier_ops.fetch_rows(self.words(layer), src, tier_ops.words(out), torch.arange(len(groups), device=self.device),
                                self.group_words)
        return out

    def stats(self) -> dict:
        return {}

    def reset_counts(self) -> None:
        pass

    def close(self) -> None:
        pass


class FullHostKV(HostKV):
    affine_rows = True

    def __init__(self, layout: GroupLayout, max_seqs: int, max_groups: int, device: torch.device):
        super().__init__(layout, max_seqs, max_groups, device)
        pin = device.type == "cuda"
        check_host_room(layout.num_layers * max_seqs * max_groups * layout.group_bytes,
                        f"the KV of {max_seqs} sequences x {max_groups * layout.group_tokens} tokens")
        self.pools = [torch.zeros(max_seqs * max_groups, *layout.slot_shape, dtype=layout.dtype, pin_memory=pin)
                      for _ in range(layout.num_layers)]  # (S*N, 2, H_kv, G, D) per layer

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.pools)

    def words(self, layer):
        return tier_ops.words(self.pools[layer])

    def typed(self, layer):
        return self.pools[layer]

    def rows(self, layer, slots, groups):
        return slots[:, None] * self.n + groups

    def put(self, layer, slot, first, groups):
        base = slot * self.n + first  # a sequence's groups are consecutive rows: one DMA
        self.pools[layer][base : base + groups.shape[0]].copy_(groups, non_blocking=True)

    def gather(self, layer, slot, groups):
        if groups and groups == list(range(groups[0], groups[0] + len(groups))):  # one contiguous DMA
            base = slot * self.n + groups[0]
            return self.pools[layer][base : base + len(groups)].to(self.device, non_blocking=True)
        return super().gather(layer, slot, groups)


class _Done:
    def synchronize(self) -> None:
        pass


class DiskBackedHostKV(HostKV):
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
        self.slot_of = np.full((nl, max_seqs, max_groups), -1, dtype=np.int64)  # host slot, -1: not in host
        self.slot_gpu = torch.full((nl, max_seqs, max_groups), -1, dtype=torch.int64, device=device)
        self.owner = [np.full(a.num_slots, -1, dtype=np.int64) for a in self.arenas]  # slot -> seq*N + group
        self.stamp = [np.zeros(a.num_slots) for a in self.arenas]
        # Durable disk copy of (layer, seq*N + group): (device, slot), -1 while there is none. A
        # group is durable (may leave host memory) exactly when it has one.
        self.disk_at = np.full((nl, max_seqs * max_groups, 2), -1, dtype=np.int64)
        self.pool = DiskPool.open(list(disk), layout, direct=direct, faults=faults)
        self._writes: deque = deque()  # (layer, flats, addrs, future), oldest first
        self.clock = 0.0
        self._last_step = _Done()  # event after the last forward's reads and writes of the arenas
        self.counts = {"disk_reads": 0, "read_ahead": 0, "disk_writes": 0, "lost": 0, "host_evictions": 0}
        self._ahead: dict[int, tuple] = {}  # layer -> (flats, slots, future): reads in flight

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
    def _alloc(self, layer: int, n: int, protect: set[int]) -> list[int]:
        arena = self.arenas[layer]
        if n > arena.num_slots:
            raise CapacityError(f"layer {layer}: {n} groups must be in host memory at once, the arena has "
                                f"{arena.num_slots} slots: raise the host budget")
        while arena.num_free < n:
            own = self.owner[layer]
            used = np.nonzero(own >= 0)[0]
            flat = own[used]
            ok = (self.disk_at[layer, flat, 1] >= 0) & ~np.isin(flat, list(protect))
            cand = used[ok]
            victims = cand[np.argsort(self.stamp[layer][cand], kind="stable")[: n - arena.num_free]]
            if len(victims):
                self._last_step.synchronize()  # GPU copies of the last step may still read these slots
                self._evict(layer, victims)
            elif self._writes:
                self._reap(wait_one=True)
            else:
                raise CapacityError(f"layer {layer}: host arena of {arena.num_slots} groups is full and no group can "
                                    f"leave (the rest are in use now or not yet on disk): raise the host budget")
        return arena.alloc(n)

    def _evict(self, layer: int, slots: np.ndarray) -> None:
        flat = self.owner[layer][slots]
        s, g = np.divmod(flat, self.n)
        self.slot_of[layer, s, g] = -1
        self.slot_gpu[layer][torch.as_tensor(s, device=self.device), torch.as_tensor(g, device=self.device)] = -1
        self.owner[layer][slots] = -1
        self.arenas[layer].free(slots.tolist())
        self.counts["host_evictions"] += len(slots)

    def _map(self, layer: int, flat: np.ndarray, slots: list[int]) -> None:
        s, g = np.divmod(flat, self.n)
        sl = np.asarray(slots, dtype=np.int64)
        self.slot_of[layer, s, g] = sl
        self.owner[layer][sl] = flat
        self.stamp[layer][sl] = self.clock
        self.slot_gpu[layer][torch.as_tensor(s, device=self.device),
                             torch.as_tensor(g, device=self.device)] = torch.as_tensor(sl, device=self.device)

    # -- write path -------------------------------------------------------------------
    def begin(self, slot_list, starts, num_new):
        self.clock += 1
        g = self.layout.group_tokens
        s_idx = np.repeat(slot_list, [(st + num_new - 1) // g - st // g + 1 for st in starts])
        g_idx = np.concatenate([np.arange(st // g, (st + num_new - 1) // g + 1) for st in starts])
        flat = s_idx * self.n + g_idx
        for layer in range(len(self.arenas)):
            missing = flat[self.slot_of[layer, s_idx, g_idx] < 0]
            if len(missing):
                slots = self._alloc(layer, len(missing), set(flat.tolist()))
                self.arenas[layer].rows[slots] = 0  # a group's unwritten tail reads as zeros, never stale data
                self._map(layer, missing, slots)

    def end(self, slot_list, starts, num_new, written):
        self._last_step = written
        g = self.layout.group_tokens
        full = [(s, grp) for s, st in zip(slot_list, starts) for grp in range(st // g, (st + num_new) // g)]
        if not full:
            self._reap()
            return
        flat = np.array([s * self.n + grp for s, grp in full], dtype=np.int64)
        for layer, arena in enumerate(self.arenas):
            slots = self.slot_of[layer].reshape(-1)[flat]
            addrs = self.pool.alloc(len(flat))
            fut = self.pool.write(addrs, [arena.buffer(int(x)) for x in slots], before=written.synchronize)
            self._writes.append((layer, flat, addrs, fut))
            self.counts["disk_writes"] += len(flat)
        self._reap()

    def _reap(self, wait_all: bool = False, wait_one: bool = False) -> None:
        while self._writes:
            layer, flat, addrs, fut = self._writes[0]
            if not (wait_all or wait_one or fut.done()):
                return
            self._writes.popleft()
            wait_one = False
            for f, a, r in zip(flat.tolist(), addrs, fut.result()):
                if r is None:
                    self.disk_at[layer, f] = a
                else:  # the host copy stays (not durable, so never evicted)
                    self.pool.free([a])

    # -- read path --------------------------------------------------------------------
    def _addrs(self, layer: int, flat: np.ndarray) -> list[DiskAddr]:
        return [DiskAddr(int(d), int(x)) for d, x in self.disk_at[layer, flat]]

    def _submit(self, layer: int, flat: np.ndarray, protect: set[int]):
        """Host slots for the durable groups ``flat`` and their disk reads, all devices at once."""
        slots = self._alloc(layer, len(flat), protect)
        return slots, self.pool.read(self._addrs(layer, flat), [self.arenas[layer].buffer(x) for x in slots])

    def _adopt(self, layer: int, flat: np.ndarray, slots: list[int], results) -> np.ndarray:
        """Map the groups whose read succeeded, free the slots of the others; (n,) bool ok."""
        ok = np.array([r is None for r in results], dtype=bool)
        self.arenas[layer].free([x for x, good in zip(slots, ok) if not good])
        if ok.any():
            self._map(layer, flat[ok], [x for x, good in zip(slots, ok) if good])
        return ok

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
            self.counts["read_ahead"] += int(self._adopt(layer, flat, slots, fut.result()).sum())

    def resolve(self, layer, slot_list, groups, need, keep=None):
        self._land(layer)
        self.clock += 1
        failed = np.zeros_like(need)
        s = np.asarray(slot_list, dtype=np.int64)[:, None].repeat(groups.shape[1], 1)
        flat_all = s * self.n + groups
        host = self.slot_of[layer, s, groups]
        keep = need if keep is None else keep
        # LRU over what the step selects, GPU-cache hits included: a group the GPU cache holds
        # stays warm here too, so when that cache evicts it a later pick reads host, not disk
        touched = host[(host >= 0) & keep.astype(bool)]
        self.stamp[layer][touched] = self.clock
        want = need & (host < 0)
        if not want.any():
            return failed
        flat = np.unique(flat_all[want])
        on_disk = self.disk_at[layer, flat, 1] >= 0
        ok = np.zeros(len(flat), dtype=bool)
        if on_disk.any():
            slots, fut = self._submit(layer, flat[on_disk], set(flat_all[need].tolist()))
            ok[on_disk] = self._adopt(layer, flat[on_disk], slots, fut.result())
        self.counts["disk_reads"] += int(ok.sum())
        if not ok.all():
            lost = flat[~ok]
            bad = lost[self.disk_at[layer, lost, 1] >= 0]
            self.pool.free(self._addrs(layer, bad))  # never read a bad copy again
            self.disk_at[layer, lost] = -1
            failed = want & np.isin(flat_all, lost)
            self.counts["lost"] += int(failed.sum())
        return failed

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
        for layer in list(self._ahead):
            self._land(layer)
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
            self.pool.free(self._addrs(layer, span[self.disk_at[layer, span, 1] >= 0]))
            self.disk_at[layer, span] = -1

    def reset_counts(self) -> None:
        self.counts = dict.fromkeys(self.counts, 0)

    def stats(self) -> dict:
        return dict(self.counts, disk_bytes=self.pool.bytes_used(),
                    host_resident_groups=int(sum(a.num_slots - a.num_free for a in self.arenas)))

    def close(self) -> None:
        for layer in list(self._ahead):
            self._land(layer)
        self._reap(wait_all=True)
        self.pool.close()
