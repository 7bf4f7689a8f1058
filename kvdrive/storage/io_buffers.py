"""Slabs of fixed-size slots: page-aligned memory and an O(1) free list.

Every tier that holds groups in memory (GPU slot pool, pinned host arena) and every
extent file on disk is an array of equal slots handed out by a ``FreeList``.
"""

from __future__ import annotations

import torch

from kvdrive import device as dev
from kvdrive.errors import CapacityError
from kvdrive.storage.layout import ALIGN


def aligned_empty(nbytes: int, device: torch.device, pin: bool, alignment: int = ALIGN) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` whose data_ptr is a multiple of ``alignment``.

    One allocation, over-allocated by ``alignment`` and sliced, so the result is a view
    that keeps the base alive. ``pin`` asks for pinned (page-locked, device-mapped)
    host memory; it is ignored where the device seam says pinning is unsupported.
    """
    if device.type != "cpu":
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    pin = pin and dev.pin_supported()
    if pin:
        base = dev.pinned_empty(nbytes)  # page-aligned, registered at its exact size
        if base.data_ptr() % alignment == 0:
            return base
    base = torch.empty(nbytes + alignment, dtype=torch.uint8, pin_memory=pin)
    offset = (-base.data_ptr()) % alignment
    out = base[offset : offset + nbytes]
    assert out.data_ptr() % alignment == 0
    return out


class FreeList:
    """Free slot indices of a fixed pool of ``capacity`` slots.

    ``alloc`` and ``free`` are O(1) per slot (a LIFO stack, so recently freed, still
    cached slots are reused first) and allocate nothing after construction beyond the
    returned list. A state byte per slot catches double frees and frees of slots never
    handed out, which would otherwise corrupt the pool silently.
    """

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._stack = list(range(capacity - 1, -1, -1))  # top of stack = end = slot 0 first
        self._used = bytearray(capacity)

    @property
    def num_free(self) -> int:
        return len(self._stack)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._stack)

    def alloc(self, n: int, what: str = "slots") -> list[int]:
        """``n`` slots, all or none: raises ``CapacityError`` if fewer are free."""
        if n > len(self._stack):
            raise CapacityError(f"{what}: {n} needed, {len(self._stack)} free of {self.capacity}")
        cut = len(self._stack) - n
        out = self._stack[:cut - 1 if cut else None : -1]  # top of stack first: ascending on a fresh list
        del self._stack[cut:]
        for s in out:
            self._used[s] = 1
        return out

    def free(self, slots) -> None:
        for s in slots:
            if not 0 <= s < self.capacity or not self._used[s]:
                raise RuntimeError(f"free of slot {s} that is not allocated (double free?)")
            self._used[s] = 0
            self._stack.append(s)

    def grow(self, extra: int) -> None:
        """Add ``extra`` slots at the end of the index range; they are handed out lowest first."""
        self._stack[:0] = range(self.capacity + extra - 1, self.capacity - 1, -1)
        self._used.extend(bytes(extra))
        self.capacity += extra

    def is_used(self, slot: int) -> bool:
        return bool(self._used[slot])
