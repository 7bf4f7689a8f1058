"""``ArenaIndex``: the bookkeeping of a disk tier's pinned host arena, in numpy only.

Which arena slot holds which group, which slots are free, how recently each group was
used, which groups have a durable disk copy, and which are being read: no tensors, no
I/O, no device. ``DiskBackedHostKV`` moves the bytes (arena memory, disk reads and
writes, the GPU's copy of the map) and asks this index what to move; tests drive it
directly.

Per layer (every layer has the same number of slots ``num_slots``); a group is named by
its flat id ``seq * max_groups + group``:

* ``slot_of`` (L, S, N) int64: arena slot of each group, -1 when not in host memory
  (``by_flat`` is the same array as (L, S * N));
* ``owner`` (L, num_slots) int64: flat id held by each slot, -1 when empty;
* ``stamp`` (L, num_slots) float: LRU stamp of each slot's group. A decode step's uses get
  ``clock`` (one more per decode step), a prefill's ``clock - 0.25``, and placement
  priorities (``prioritize``) lie in (clock - 1, clock - 0.5): below both;
* ``disk_at`` (L, S * N, 2) int64: durable disk copy (device, slot), -1 while there is
  none. A group may leave host memory exactly when it has one;
* ``reading`` (L, S * N) bool: a deferred read of the group is in flight;
* ``prio`` (L, S * N) float: placement priority of each group, -inf when unranked;
* a free list per layer, and ``held`` slots: evicted while a step that may still read
  them is in flight, free once its event (anything with ``query``/``synchronize``) is done.

Every change of ``slot_of`` is also queued (``take_changes``) for the copy on the device.
Costs: ``map``/``evict``/``touch`` are O(groups touched); choosing ``victims`` is O(arena)
(an argpartition, not a sort), which is why callers evict in batches.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from kvdrive.errors import CapacityError


class ArenaIndex:
    def __init__(self, num_layers: int, max_seqs: int, max_groups: int, num_slots: int):
        nl, self.max_seqs, self.n, self.num_slots = num_layers, max_seqs, max_groups, num_slots
        self.slot_of = np.full((nl, max_seqs, max_groups), -1, dtype=np.int64)
        self.by_flat = self.slot_of.reshape(nl, -1)  # a view: (layer, seq * N + group)
        self.owner = np.full((nl, num_slots), -1, dtype=np.int64)
        self.stamp = np.zeros((nl, num_slots))
        self.disk_at = np.full((nl, max_seqs * max_groups, 2), -1, dtype=np.int64)
        self.reading = np.zeros((nl, max_seqs * max_groups), dtype=bool)
        self.prio = np.full((nl, max_seqs * max_groups), -np.inf)
        # LIFO free stacks (recently freed slots first), as ``FreeList``; ``_taken`` catches double frees
        self._free = [list(range(num_slots - 1, -1, -1)) for _ in range(nl)]
        self._taken = np.zeros((nl, num_slots), dtype=bool)
        self.held = [deque() for _ in range(nl)]  # per layer: (event, slots) evicted, free once it completes
        self.clock = 0.0
        self.now = -0.25  # the stamp of a use now
        self._changes: list[np.ndarray] = []  # (4, n): layer, seq, group, slot (-1: left host memory)

    @property
    def num_layers(self) -> int:
        return len(self._free)

    # -- time -------------------------------------------------------------------------
    def begin(self, num_new: int) -> None:
        """A forward starts: a decode step (``num_new == 1``) advances the clock."""
        if num_new == 1:
            self.clock += 1
        self.now = self.clock if num_new == 1 else self.clock - 0.25

    # -- free slots -------------------------------------------------------------------
    def num_free(self, layer: int) -> int:
        return len(self._free[layer])

    def num_held(self, layer: int) -> int:
        return sum(len(slots) for _, slots in self.held[layer])

    def resident(self) -> int:
        """Groups in host memory, all layers."""
        return sum(self.num_slots - len(f) for f in self._free)

    def take(self, layer: int, n: int) -> list[int]:
        """``n`` free slots of ``layer``, all or none (``CapacityError``)."""
        stack = self._free[layer]
        if n > len(stack):
            raise CapacityError(f"layer {layer}: {n} arena slots needed, {len(stack)} free of {self.num_slots}")
        cut = len(stack) - n
        out = stack[: cut - 1 if cut else None : -1]  # top of the stack first
        del stack[cut:]
        self._taken[layer, out] = True
        return out

    def release(self, layer: int, slots) -> None:
        """Slots back to the free list (their groups are unmapped already, or never were)."""
        slots = list(slots)
        if not self._taken[layer, slots].all():
            raise RuntimeError(f"layer {layer}: free of arena slots that are not allocated (double free?)")
        self._taken[layer, slots] = False
        self._free[layer].extend(slots)

    def recycle(self, layer: int, block: bool = False) -> None:
        """Free the held slots whose last possible reader is done (``block``: wait for the oldest)."""
        held = self.held[layer]
        while held and (block or held[0][0].query()):
            event, slots = held.popleft()
            event.synchronize()
            self.release(layer, slots)
            block = False

    # -- mapping ----------------------------------------------------------------------
    def map(self, layer, flat: np.ndarray, slots) -> None:
        """Groups ``flat`` of ``layer`` (one layer, or one per group) now live in ``slots``, used now."""
        s, g = np.divmod(flat, self.n)
        sl = np.asarray(slots, dtype=np.int64)
        lay = np.broadcast_to(np.asarray(layer, dtype=np.int64), sl.shape)
        self.slot_of[lay, s, g] = sl
        self.owner[lay, sl] = flat
        self.stamp[lay, sl] = self.now
        self._changes.append(np.stack([lay, s, g, sl]))

    def victims(self, layer: int, n: int, protect: set[int]) -> np.ndarray:
        """Up to ``n`` slots of durable groups not in ``protect``, least recently used first."""
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

    def evict(self, layer: int, slots: np.ndarray, in_flight) -> None:
        """Unmap the groups of ``slots``; the slots are held until ``in_flight`` (the event of the
        last step committed, which may still read them) completes."""
        flat = self.owner[layer][slots]
        s, g = np.divmod(flat, self.n)
        self.slot_of[layer, s, g] = -1
        self._changes.append(np.stack([np.full_like(s, layer), s, g, np.full_like(s, -1)]))
        self.owner[layer][slots] = -1
        self.held[layer].append((in_flight, slots.tolist()))

    def touch(self, layer: int, slot_list, groups: np.ndarray, selected: np.ndarray):
        """Stamp the ``selected`` of ``groups`` (B, P) of sequences ``slot_list`` that are in the
        arena as used now; returns their flat ids (B, P) and slots (B, P) (-1: not in host)."""
        s = np.asarray(slot_list, dtype=np.int64)[:, None].repeat(groups.shape[1], 1)
        host = self.slot_of[layer, s, groups]
        self.stamp[layer][host[(host >= 0) & selected]] = self.now
        return s * self.n + groups, host

    def stamp_used(self, layers, slot_list, groups: np.ndarray, used: np.ndarray) -> np.ndarray:
        """A finished decode step's selections: ``groups`` (L, B, P) of ``layers`` and sequences
        ``slot_list``; the ``used`` (L*B*P,) that are in the arena get ``clock``. Returns the
        (L*B*P,) keys ``layer * S * N + flat`` of every entry (``np.divmod`` by ``S * N`` splits them)."""
        lay = np.asarray(layers, dtype=np.int64)[:, None, None]
        seq = np.asarray(slot_list, dtype=np.int64)[None, :, None]
        per_layer = self.n * self.max_seqs
        key = (lay * per_layer + seq * self.n + groups).reshape(-1)
        host = self.slot_of.reshape(-1)[key]
        hit = used & (host >= 0)
        self.stamp.reshape(-1)[key[hit] // per_layer * self.num_slots + host[hit]] = self.clock
        return key

    def take_changes(self) -> np.ndarray | None:
        """The queued changes of ``slot_of`` as (4, n) layer, seq, group, slot, one per group
        (a group changed twice keeps its last value); None when there are none."""
        if not self._changes:
            return None
        a = np.concatenate(self._changes, axis=1)
        self._changes.clear()
        key = (a[0] * self.max_seqs + a[1]) * self.n + a[2]
        _, last = np.unique(key[::-1], return_index=True)  # the last change of each entry
        return a[:, len(key) - 1 - last]

    # -- placement --------------------------------------------------------------------
    def prioritize(self, layer: int, slot_list, importance: np.ndarray, counts: np.ndarray) -> None:
        """Rank the first ``counts`` (B,) groups of each of ``slot_list`` by ``importance`` (B, N)
        within its sequence: priorities in (clock - 1, clock - 0.5), the most important highest,
        so sequences ranked at the same clock compare by rank; their arena slots are restamped."""
        counts = np.asarray(counts, dtype=np.int64)
        if not counts.sum():
            return
        rows = np.repeat(np.arange(len(counts)), counts)
        g = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)  # group within its sequence
        flat = np.asarray(slot_list, dtype=np.int64)[rows] * self.n + g
        order = np.lexsort((importance[rows, g], rows))  # by sequence, least important first
        prio = np.empty(len(rows))
        prio[order] = self.clock - 1 + 0.5 * (g + 1) / (counts[rows] + 1)
        self.prio[layer, flat] = prio
        host = self.by_flat[layer, flat]
        self.stamp[layer, host[host >= 0]] = prio[host >= 0]

    def to_place(self, layer: int, reserve: int) -> np.ndarray:
        """The durable absent groups of ``layer`` worth reading back: by priority, the free slots'
        worth (beyond ``reserve``), then as many as outrank the groups LRU would evict for them."""
        prio = self.prio[layer]
        cand = np.flatnonzero(
            (self.by_flat[layer] < 0) & (self.disk_at[layer, :, 1] >= 0) & ~self.reading[layer] & (prio > -np.inf)
        )
        if not len(cand):
            return cand
        cand = cand[np.argsort(-prio[cand], kind="stable")]
        free = max(0, self.num_free(layer) - reserve)
        own = self.owner[layer]
        used = np.flatnonzero(own >= 0)
        lru = np.sort(self.stamp[layer, used[self.disk_at[layer, own[used], 1] >= 0]])
        rest = prio[cand[free:]]
        m = min(len(rest), len(lru))
        return cand[: free + int(np.count_nonzero(rest[:m] > lru[:m]))]  # both monotone: a prefix

    # -- sequences --------------------------------------------------------------------
    def clear(self, slot: int) -> list[np.ndarray]:
        """Sequence ``slot`` starts over: its groups leave the arena (slots free at once: the caller
        has waited for the steps in flight) and lose their priorities and disk copies. Returns, per
        layer, the (n, 2) disk addresses to free."""
        span = np.arange(slot * self.n, (slot + 1) * self.n)
        out = []
        for layer in range(self.num_layers):
            held = self.slot_of[layer, slot]
            used = held[held >= 0]
            if len(used):
                self.owner[layer][used] = -1
                self.release(layer, used.tolist())
            self.slot_of[layer, slot] = -1
            self.prio[layer, span] = -np.inf
            out.append(self.disk_at[layer, span[self.disk_at[layer, span, 1] >= 0]])
            self.disk_at[layer, span] = -1
        return out
