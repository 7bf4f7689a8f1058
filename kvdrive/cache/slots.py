"""Sequence bookkeeping shared by the caches: which slot a sequence owns, how many
tokens it has committed.

``max_seqs`` slots, handed out LIFO from a free list: ``add``, ``free``, ``slot``,
``length`` and ``commit`` are O(1) per sequence and allocate nothing on the GPU.
``SlotTensors``: a batch's slot list as a device index, memoised.
"""

from __future__ import annotations

import torch

from kvdrive.errors import CapacityError, KvdriveError


class SequenceSlots:
    def __init__(self, max_seqs: int, max_len: int, what: str = "cache"):
        self.max_seqs, self.max_len, self.what = max_seqs, max_len, what
        self._free = list(range(max_seqs - 1, -1, -1))
        self._slot: dict[int, int] = {}
        self._len: dict[int, int] = {}

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._slot

    @property
    def num_free(self) -> int:
        """Sequences that can still be added."""
        return len(self._free)

    def tokens(self) -> int:
        """Tokens committed, all sequences together."""
        return sum(self._len.values())

    def add(self, seq_id: int, max_tokens: int) -> int:
        """Register ``seq_id`` with room for ``max_tokens``; returns its slot."""
        if seq_id in self._slot:
            raise KvdriveError(f"sequence {seq_id} is already in the {self.what}")
        if max_tokens > self.max_len:
            raise CapacityError(
                f"sequence needs {max_tokens} tokens, the {self.what} holds {self.max_len} per sequence"
            )
        if not self._free:
            raise CapacityError(f"all {self.max_seqs} sequence slots of the {self.what} are in use")
        slot = self._free.pop()
        self._slot[seq_id], self._len[seq_id] = slot, 0
        return slot

    def free(self, seq_id: int) -> int:
        slot = self._slot.pop(seq_id)
        del self._len[seq_id]
        self._free.append(slot)
        return slot

    def slot(self, seq_id: int) -> int:
        return self._slot[seq_id]

    def length(self, seq_id: int) -> int:
        return self._len[seq_id]

    def starts(self, seq_ids, num_new: int) -> tuple[int, ...]:
        """Committed lengths of ``seq_ids``, checked to have room for ``num_new`` more tokens."""
        starts = tuple(self._len[s] for s in seq_ids)
        if max(starts) + num_new > self.max_len:
            raise CapacityError(f"sequence would exceed the {self.what} length {self.max_len}")
        return starts

    def commit(self, seq_ids, num_new: int) -> None:
        for s in seq_ids:
            self._len[s] += num_new

    def truncate(self, seq_id: int, length: int) -> None:
        if not 0 <= length <= self._len[seq_id]:
            raise KvdriveError(f"cannot truncate sequence {seq_id} of {self._len[seq_id]} tokens to {length}")
        self._len[seq_id] = length

    def check_range(self, seq_id: int, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self._len[seq_id]:
            raise KvdriveError(f"tokens [{start}, {stop}) are not all cached for sequence {seq_id}")

    def seq_ids(self) -> list[int]:
        return sorted(self._slot)


class SlotTensors:
    """Device tensors of slot lists, memoised: a CUDA-graph capture may not copy from the host,
    and its warm-up runs (outside capture) create the tensor first."""

    def __init__(self, device: torch.device):
        self.device = device
        self._memo: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, slots: list[int]) -> torch.Tensor:
        key = tuple(slots)
        if key not in self._memo:
            self._memo[key] = torch.tensor(slots, device=self.device)
        return self._memo[key]
