"""``DeferredReads``: the deferred-miss path of a disk tier (``TieredConfig.disk_misses="defer"``):
what happens after a decode step that left its disk-only groups out of its attention.

* ``take``: the step's selections (groups and flags, all layers) on their way to the host,
  queued with the event that makes them valid;
* ``collect`` (at a later ``begin``): stamp the arena's LRU with what finished steps selected
  and submit one read batch, all layers, for what they left out;
* ``land`` (at ``begin``): map the reads that arrived; a failed read is lost.

Owns the selections in flight and the reads behind; reads and writes the arena's
bookkeeping through its ``ArenaIndex`` and moves bytes through the arena's ``alloc``,
``read``, ``lose`` (a ``DiskBackedHostKV``).
"""

from __future__ import annotations

from collections import deque

import numpy as np


class DeferredReads:
    MAX_SELECTIONS_IN_FLIGHT = 4  # steps whose selections may wait for the host before begin blocks

    def __init__(self, index, arena, reserve: int):
        """``reserve``: arena slots per layer the reads behind leave free (the groups the next steps open)."""
        self.index, self.arena, self.reserve = index, arena, reserve
        self._selections: deque = deque()  # (slot_list, layers, groups, flags, event) per step, oldest first
        self._reads: deque = deque()  # a step's reads behind, all layers: (layers, flats, slots, future)
        self.counts = {"deferred": 0, "deferred_reads": 0, "lost": 0}

    def reset_counts(self) -> None:
        self.counts = dict.fromkeys(self.counts, 0)

    def take(self, slot_list, layers: list[int], groups, flags, event) -> None:
        """A decode step's selections, copied to the host asynchronously: ``groups`` (L, B, P)
        and ``flags`` (L, B, P) uint8 (1: selected, 2: left out, on disk only) for ``layers``,
        valid once ``event`` completes. Taken (without waiting) at a later ``collect``."""
        self._selections.append((list(slot_list), layers, groups, flags, event))

    def collect(self) -> None:
        """Stamp what finished steps selected and read what they left out, into free arena slots:
        all layers of a step at once, in one read batch (per-layer batches cost the engine thread
        an executor hand-off per layer, and their Python time competes for the GIL with the step)."""
        index = self.index
        while self._selections and (
            self._selections[0][4].query() or len(self._selections) > self.MAX_SELECTIONS_IN_FLIGHT
        ):
            slot_list, layers, groups, flags, event = self._selections.popleft()
            event.synchronize()
            flags = flags.numpy().reshape(-1)
            key = index.stamp_used(layers, slot_list, groups.numpy(), flags & 1 > 0)
            left = flags & 2 > 0
            if left.any():
                self.counts["deferred"] += int(left.sum())
                self._read(*np.divmod(np.unique(key[left]), index.n * index.max_seqs))

    def _read(self, layers: np.ndarray, flat: np.ndarray) -> None:
        """Read groups ``flat`` of ``layers`` (sorted by layer) that are still on disk only and not
        already being read, into the arena slots free now; the rest wait for a later step."""
        index = self.index
        keep = (index.by_flat[layers, flat] < 0) & (index.disk_at[layers, flat, 1] >= 0) & ~index.reading[layers, flat]
        layers, flat = layers[keep], flat[keep]
        take = np.zeros(len(flat), dtype=bool)
        slots = np.empty(len(flat), dtype=np.int64)
        for layer in np.unique(layers).tolist():
            at = np.flatnonzero(layers == layer)
            got = self.arena.alloc(layer, len(at), set(), wait=False, reserve=self.reserve)
            take[at[: len(got)]] = True
            slots[at[: len(got)]] = got
        if not take.any():
            return
        layers, flat, slots = layers[take], flat[take], slots[take]
        fut = self.arena.read(layers, flat, slots)
        self._reads.append((layers, flat, slots, fut))
        index.reading[layers, flat] = True

    def land(self, block: bool = False) -> None:
        """Map the reads behind that arrived (``block``: all of them); a failed read is lost."""
        index = self.index
        keep: deque = deque()
        for layers, flat, slots, fut in self._reads:
            if not (block or fut.done()):
                keep.append((layers, flat, slots, fut))
                continue
            index.reading[layers, flat] = False
            ok = fut.ok()
            here = index.by_flat[layers, flat] >= 0  # a synchronous read overtook it
            for layer in np.unique(layers[here | ~ok]).tolist():
                index.release(layer, slots[(layers == layer) & (here | ~ok)].tolist())
            good = ok & ~here
            if good.any():
                index.map(layers[good], flat[good], slots[good])
            self.counts["deferred_reads"] += int(good.sum())
            bad = ~ok & ~here
            for layer in np.unique(layers[bad]).tolist():
                self.arena.lose(layer, flat[bad & (layers == layer)])
            self.counts["lost"] += int(bad.sum())
        self._reads = keep

    def drain(self) -> None:
        """Every selection and read behind in flight landed."""
        while self._selections:
            self._selections[0][4].synchronize()
            self.collect()
        self.land(block=True)
