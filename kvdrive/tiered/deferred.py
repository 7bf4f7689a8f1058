"""Deferred disk misses of ``DiskBackedHostKV`` (``TieredConfig.disk_misses="defer"``), a mixin
split out by phase: what happens after a graphed decode step that left disk-only groups out.

* ``take_selections``: the step's selections (groups and flags, all layers) on their way to
  the host, queued with the event that makes them valid;
* ``_take_selections`` (at a later ``begin``): stamp the arena's LRU with what finished steps
  selected and submit one read batch, all layers, for what they left out;
* ``_land_deferred`` (at ``begin``): map the reads that arrived; a failed read is lost.

It uses the arena state of ``DiskBackedHostKV`` (``slot_of``, ``stamp``, ``disk_at``,
``_reading``, ``_selections``, ``_deferred``, ``counts``) and its capacity and read methods
(``_alloc``, ``_read``, ``_map``, ``_lose``).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch


class DeferredReads:
    MAX_SELECTIONS_IN_FLIGHT = 4  # steps whose selections may wait for the host before begin blocks

    def take_selections(self, slot_list, layers: list[int], groups: torch.Tensor, flags: torch.Tensor, event) -> None:
        """A decode step's selections, copied to the host asynchronously: ``groups`` (L, B, P)
        and ``flags`` (L, B, P) uint8 (1: selected, 2: left out, on disk only) for ``layers``,
        valid once ``event`` completes. Taken (without waiting) at a later ``begin``."""
        self._selections.append((list(slot_list), layers, groups, flags, event))

    def _take_selections(self) -> None:
        """Stamp what finished steps selected and read what they left out, into free arena slots:
        all layers of a step at once, in one read batch (per-layer batches cost the engine thread
        ~30 executor hand-offs a step, and their Python time competes for the GIL with the step)."""
        while self._selections and (self._selections[0][4].query()
                                    or len(self._selections) > self.MAX_SELECTIONS_IN_FLIGHT):
            slot_list, layers, groups, flags, event = self._selections.popleft()
            event.synchronize()
            flags = flags.numpy().reshape(-1)
            lay = np.asarray(layers, dtype=np.int64)[:, None, None]
            seq = np.asarray(slot_list, dtype=np.int64)[None, :, None]
            per_layer = self.n * self.max_seqs
            key = (lay * per_layer + seq * self.n + groups.numpy()).reshape(-1)  # (L*B*P,) into slot_of's layers
            host = self.slot_of.reshape(-1)[key]
            hit = (flags & 1 > 0) & (host >= 0)
            self.stamp.reshape(-1)[key[hit] // per_layer * self.stamp.shape[1] + host[hit]] = self.clock
            left = flags & 2 > 0
            if left.any():
                self.counts["deferred"] += int(left.sum())
                self._read_deferred(*np.divmod(np.unique(key[left]), per_layer))

    def _read_deferred(self, layers: np.ndarray, flat: np.ndarray) -> None:
        """Read groups ``flat`` of ``layers`` (sorted by layer) that are still on disk only and not
        already being read, into the arena slots free now; the rest wait for a later step."""
        keep = ((self._slot_by_flat[layers, flat] < 0)
                & (self.disk_at[layers, flat, 1] >= 0) & ~self._reading[layers, flat])
        layers, flat = layers[keep], flat[keep]
        take = np.zeros(len(flat), dtype=bool)
        slots = np.empty(len(flat), dtype=np.int64)
        for layer in np.unique(layers).tolist():
            at = np.flatnonzero(layers == layer)
            got = self._alloc(layer, len(at), set(), wait=False, reserve=self.reserve)
            take[at[: len(got)]] = True
            slots[at[: len(got)]] = got
        if not take.any():
            return
        layers, flat, slots = layers[take], flat[take], slots[take]
        fut = self._read(layers, flat, slots)
        self._deferred.append((layers, flat, slots, fut))
        self._reading[layers, flat] = True

    def _land_deferred(self, block: bool = False) -> None:
        """Map the deferred reads that arrived (``block``: all of them); a failed read is lost."""
        keep: deque = deque()
        for layers, flat, slots, fut in self._deferred:
            if not (block or fut.done()):
                keep.append((layers, flat, slots, fut))
                continue
            self._reading[layers, flat] = False
            ok = fut.ok()
            here = self._slot_by_flat[layers, flat] >= 0  # a synchronous read overtook it
            for layer in np.unique(layers[here | ~ok]).tolist():
                self.arenas[layer].free(slots[(layers == layer) & (here | ~ok)].tolist())
            good = ok & ~here
            if good.any():
                self._map(layers[good], flat[good], slots[good])
            self.counts["deferred_reads"] += int(good.sum())
            bad = ~ok & ~here
            for layer in np.unique(layers[bad]).tolist():
                self._lose(layer, flat[bad & (layers == layer)])
            self.counts["lost"] += int(bad.sum())
        self._deferred = keep
