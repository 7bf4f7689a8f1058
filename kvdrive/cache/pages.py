"""Page bookkeeping of the paged plain cache: which pages of the pool each sequence holds,
and how many it has been promised.

A sequence reserves pages for its ``max_tokens`` when it is added (no preemption: a sequence
admitted never runs out of pages mid-decode), and takes them one by one as it grows; pages
go back on ``free``. Invariant: ``len(free) >= owed``, where ``owed`` counts pages reserved
but not yet taken, so ``grow`` within a reservation always succeeds. Pages are handed out
LIFO from a free list: ``add``, ``grow`` (per page), ``free`` (per page) are O(1). Plain
Python, no torch: the cache mirrors the page lists into its device page table.
"""

from __future__ import annotations

from kvdrive.errors import CapacityError, KvdriveError


class PageAllocator:
    def __init__(self, num_pages: int, page_tokens: int):
        if num_pages < 1 or page_tokens < 1:
            raise KvdriveError(f"a page pool needs pages and tokens per page, got {num_pages} x {page_tokens}")
        self.num_pages, self.page_tokens = num_pages, page_tokens
        self._free = list(range(num_pages - 1, -1, -1))
        self._held: dict[int, list[int]] = {}
        self._reserved: dict[int, int] = {}
        self._owed = 0  # pages reserved and not yet taken, all sequences together

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_tokens)

    @property
    def num_available(self) -> int:
        """Pages neither held nor promised to a registered sequence."""
        return len(self._free) - self._owed

    @property
    def num_held(self) -> int:
        return self.num_pages - len(self._free)

    def can_reserve(self, tokens: int) -> bool:
        return self.pages_for(tokens) <= self.num_available

    def add(self, seq_id: int, tokens: int) -> None:
        """Register ``seq_id`` with ``tokens`` tokens' pages promised; ``CapacityError`` if the pool
        cannot promise them."""
        if seq_id in self._held:
            raise KvdriveError(f"sequence {seq_id} already holds pages")
        need = self.pages_for(tokens)
        if need > self.num_available:
            raise CapacityError(
                f"sequence needs {need} pages of {self.page_tokens} tokens, {self.num_available} of the "
                f"{self.num_pages} in the pool are free"
            )
        self._held[seq_id], self._reserved[seq_id] = [], need
        self._owed += need

    def grow(self, seq_id: int, tokens: int) -> list[int]:
        """Pages taken so that ``seq_id`` holds ``tokens`` tokens; returns the new ones, in order
        (page ``len(held)`` of the sequence first). Past its reservation a sequence takes pages
        nobody was promised, or gets ``CapacityError``."""
        held = self._held[seq_id]
        need = self.pages_for(tokens) - len(held)
        if need <= 0:
            return []
        promised = max(0, self._reserved[seq_id] - len(held))
        if need - promised > self.num_available:
            raise CapacityError(f"sequence {seq_id} grew past its reservation and the page pool is full")
        new = [self._free.pop() for _ in range(need)]
        held.extend(new)
        self._owed -= min(need, promised)
        return new

    def free(self, seq_id: int) -> None:
        held = self._held.pop(seq_id)
        self._owed -= max(0, self._reserved.pop(seq_id) - len(held))
        self._free.extend(reversed(held))

    def pages(self, seq_id: int) -> list[int]:
        """The pages of ``seq_id`` in position order (page i holds its tokens i*page_tokens ..)."""
        return self._held[seq_id]
