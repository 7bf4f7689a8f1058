"""Slabs of fixed-size slots: page-aligned memory and an O(1) free list.

Every tier that holds groups in memory (GPU slot pool, pinned host arena) and every
extent file on disk is an array of equal slots handed out by a ``FreeList``; a buffer
filled and drained first in, first out (the remote tier's writes) hands out runs by ``Ring``.
"""

from __future__ import annotations

import threading
from collections import deque

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
        out = self._stack[: cut - 1 if cut else None : -1]  # top of stack first: ascending on a fresh list
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


class Ring:
    """Contiguous runs of ``rows`` rows handed out in order and freed in any order.

    The space between the oldest live run and the newest is never reused before the
    oldest is freed (first in, first out, like the write worker's queue); O(1) per call
    amortized. Thread-safe."""

    def __init__(self, rows: int):
        self.rows = rows
        self._head = 0
        self._live: deque[list] = deque()  # [start, n, freed], oldest first
        self._lock = threading.Lock()

    def _spans(self) -> list[tuple[int, int]]:
        """Free (start, length) runs."""
        if not self._live:
            return [(0, self.rows)]
        tail = self._live[0][0]
        if self._head > tail:
            return [(self._head, self.rows - self._head), (0, tail)]
        return [(self._head, tail - self._head)] if self._head < tail else []

    def largest(self) -> int:
        with self._lock:
            return max((n for _, n in self._spans()), default=0)

    def alloc(self, n: int) -> int | None:
        with self._lock:
            start = next((s for s, length in self._spans() if length >= n), None)
            if start is not None and n > 0:
                self._live.append([start, n, False])
                self._head = start + n
            return start

    def free(self, start: int) -> None:
        with self._lock:
            run = next(r for r in self._live if r[0] == start and not r[2])
            run[2] = True
            while self._live and self._live[0][2]:
                self._live.popleft()
            if not self._live:
                self._head = 0

    @property
    def used(self) -> int:
        with self._lock:
            return sum(n for _, n, freed in self._live if not freed)
