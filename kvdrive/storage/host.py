"""Host tier: one pinned, page-aligned slab of fixed-size slots under a byte budget.

Slots are ``layout.slot_bytes`` (a multiple of ``ALIGN``), so each slot is a valid
O_DIRECT buffer for the disk tier and, being pinned and device-mapped, a valid source
or destination of the GPU gather kernel. The slab is allocated once; ``alloc``/``free``
only move indices, so millions of cycles allocate and leak nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from kvdrive.errors import CapacityError, KvdriveError
from kvdrive.quant.formats import dequantize
from kvdrive.storage.faults import from_env as faults_from_env
from kvdrive.storage.io_buffers import FreeList, aligned_empty
from kvdrive.storage.layout import GroupLayout


class HostTier:
    """Pinned host arena: ``budget_bytes // slot_bytes`` slots, one allocation.

    Contract: ``alloc(n)`` returns ``n`` distinct slot indices or raises ``CapacityError``
    and changes nothing. ``free`` returns slots; freeing a slot not allocated raises.
    ``rows`` is the whole slab as (num_slots, slot_bytes) uint8 and stays valid (same
    storage) for the tier's lifetime; what a slot holds is the caller's business until it
    frees it.
    """

    def __init__(self, layout: GroupLayout, budget_bytes: int, pin: bool = True):
        num_slots = budget_bytes // layout.slot_bytes
        if budget_bytes and not num_slots:
            raise KvdriveError(
                f"host budget {budget_bytes} B is smaller than one slot ({layout.slot_bytes} B); raise it"
            )
        self.layout = layout
        nbytes = num_slots * layout.slot_bytes
        faults = faults_from_env()
        try:
            if faults is not None:
                faults.before("alloc", "host-arena", 0, nbytes)
            flat = aligned_empty(nbytes, torch.device("cpu"), pin=pin)
        except (OSError, MemoryError, RuntimeError) as err:  # torch's CPU allocator raises RuntimeError
            size = f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
            raise CapacityError(
                f"a host arena of {size} could not be allocated "
                f"({getattr(err, 'strerror', None) or err}): lower the host budget "
                "(--host-gib, host_bytes)"
            ) from None
        self._rows = flat.view(num_slots, layout.slot_bytes)  # (S, slot_bytes) uint8
        self._np = self._rows.numpy()  # shares storage; slices are buffers for preadv/pwritev
        self._free = FreeList(num_slots)
        self.pinned = self._rows.is_pinned() if num_slots else False

    def alloc(self, n: int) -> list[int]:
        return self._free.alloc(n, "host tier slots")

    def free(self, slots) -> None:
        self._free.free(slots)

    def buffer(self, slot: int) -> memoryview:
        """The ``slot_bytes`` of one slot as a writable, ALIGN-aligned buffer."""
        return memoryview(self._np[slot])

    @property
    def rows(self) -> torch.Tensor:
        return self._rows

    @property
    def num_slots(self) -> int:
        return self._free.capacity

    @property
    def num_free(self) -> int:
        return self._free.num_free

    @property
    def row_bytes(self) -> int:
        return self.rows.shape[1]

    @property
    def bytes_used(self) -> int:
        return (self.num_slots - self.num_free) * self.row_bytes

    @property
    def bytes_capacity(self) -> int:
        return self.num_slots * self.row_bytes

    def groups(self, slots: torch.Tensor | list[int]) -> torch.Tensor:
        """A gathered copy of ``slots`` as typed groups (N, 2, H_kv, G, D), dequantized if the
        layout is compressed; for tests and tools."""
        return dequantize(self.rows[slots], self.layout.kv_dtype, self.layout.group_shape, self.layout.dtype)

    def group_view(self, slot: int) -> np.ndarray:
        """The first ``stored_bytes`` of one slot (what is checksummed and transferred)."""
        return self._np[slot, : self.layout.stored_bytes]
