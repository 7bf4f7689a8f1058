"""GPU tier: one preallocated slot pool, split into resident slots and a cache.

A single allocation of ``budget_bytes`` holds slots of exactly ``group_bytes``, so
``typed`` is a clean (S, 2, H_kv, G, D) tensor that attention kernels index directly
(no per-step cudaMalloc). Two kinds of user share it:

* resident slots, reserved per sequence for its sink groups and recent window; they
  are never evicted and are released only by ``release(seq_id)``;
* cache slots, for the selection cache of decode (groups fetched in recent steps);
  the store evicts them by its policy. ``cache_slots_max`` bounds them so that
  residents of new sequences always find room.
"""

from __future__ import annotations

import torch

from kvdrive.errors import CapacityError, KvdriveError
from kvdrive.storage.host import MemoryTier
from kvdrive.storage.io_buffers import FreeList, aligned_empty
from kvdrive.storage.layout import GroupLayout


class GpuTier(MemoryTier):
    def __init__(self, layout: GroupLayout, budget_bytes: int, device: torch.device, cache_fraction: float = 0.5):
        if not 0.0 <= cache_fraction <= 1.0:
            raise KvdriveError(f"gpu cache_fraction must be in [0, 1], got {cache_fraction}")
        self.layout = layout
        self.device = device
        num_slots = budget_bytes // layout.group_bytes
        flat = aligned_empty(num_slots * layout.group_bytes, device, pin=False)
        self._rows = flat.view(num_slots, layout.group_bytes)  # (S, group_bytes) uint8
        self.typed = layout.as_groups(self._rows)  # (S, 2, H_kv, G, D), same storage
        self._free = FreeList(num_slots)
        self.cache_slots_max = int(num_slots * cache_fraction)
        self._cache_used = 0
        self._resident: dict[int, list[int]] = {}

    @property
    def cache_free(self) -> int:
        """Cache slots that can be taken now without evicting."""
        return min(self.cache_slots_max - self._cache_used, self._free.num_free)

    def alloc(self, n: int) -> list[int]:
        """Cache slots (bounded by ``cache_slots_max``)."""
        if self._cache_used + n > self.cache_slots_max:
            raise CapacityError(
                f"GPU selection cache: {n} slots needed, {self.cache_slots_max - self._cache_used} "
                f"free of {self.cache_slots_max}"
            )
        slots = self._free.alloc(n, "GPU slots")
        self._cache_used += n
        return slots

    def free(self, slots) -> None:
        slots = list(slots)
        self._free.free(slots)
        self._cache_used -= len(slots)

    def reserve(self, seq_id: int, n: int) -> torch.Tensor:
        """``n`` more resident slots for ``seq_id`` (sinks, window); returns their indices (n,) int64."""
        slots = self._free.alloc(n, f"GPU resident slots for sequence {seq_id}")
        self._resident.setdefault(seq_id, []).extend(slots)
        return torch.tensor(slots, dtype=torch.int64)

    def resident(self, seq_id: int) -> list[int]:
        return list(self._resident.get(seq_id, ()))

    def release(self, seq_id: int) -> None:
        """Return every resident slot of ``seq_id`` (no-op if it has none)."""
        self._free.free(self._resident.pop(seq_id, ()))
