"""Where the tiered cache keeps every group: the ``HostKV`` interface, and all of it in
pinned host memory (``FullHostKV``).

``HostKV`` is what ``TieredSparseKVCache`` reads misses from. ``rows`` maps (sequence slot,
group) to a row of the layer's host pool on the device (-1: on disk only), so the GPU
fetch kernel needs no host work. Two implementations:

* ``FullHostKV`` (here): one pinned pool per layer with a row for every group of every
  sequence slot (row = slot * N + group). Nothing can miss.
* ``DiskBackedHostKV`` (``disk_host_kv.py``): a pinned arena per layer in front of the disk pool.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from kvdrive.cache.base import TierBytes
from kvdrive.errors import CapacityError
from kvdrive.storage.gather import copy_rows, words
from kvdrive.storage.layout import GroupLayout

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
        raise CapacityError(
            f"{what} needs {nbytes / 2**30:.1f} GiB of pinned host memory, "
            f"{room / 2**30:.1f} GiB is available: lower the batch or the "
            "maximum length, or keep the KV on disk (--disk DIR with a smaller --host-gib)"
        )


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

    def place(self, layer: int, slot_list: list[int], importance: np.ndarray, counts: np.ndarray) -> int:
        """Initial placement by importance of newly prefilled sequences: ``importance`` (B, N) of
        their first ``counts`` (B,) full groups of ``layer`` (higher: more likely attended). A tier
        that holds only part of the KV in host memory keeps the most important; returns the
        groups read to do so. Everything is in host memory here: nothing to do."""
        return 0

    def resolve(
        self, layer: int, slot_list: list[int], groups: np.ndarray, need: np.ndarray, keep: np.ndarray | None = None
    ) -> np.ndarray:
        """Bring ``groups`` (B, P) where ``need`` into host rows; returns the (B, P) mask that failed.
        ``keep`` (B, P): every group this step selects, GPU-cache hits too (default ``need``); a
        host tier that evicts uses it to keep them."""
        return np.zeros_like(need)

    def read_ahead(self, layer: int, slot_list: list[int], groups: np.ndarray, need: np.ndarray) -> None:
        """Start reading ``groups`` (B, P) where ``need`` into host rows, without waiting; the next
        ``resolve`` of ``layer`` adopts what arrived."""

    def clear(self, slot: int) -> None:
        """A sequence slot starts over."""

    def drain(self) -> None:
        """Every read in flight has landed (a tier that reads from disk behind the steps)."""

    def put(self, layer: int, slot: int, first: int, groups: torch.Tensor) -> None:
        """Whole groups ``first ..`` of one sequence from the device (n, 2, H_kv, G, D) into their
        host rows (a prefill: row-sized copies, not one 2 x D-element write per token)."""
        rows = self.rows(
            layer,
            torch.tensor([slot], device=self.device),
            torch.arange(first, first + groups.shape[0], device=self.device)[None],
        )[0]
        copy_rows(
            self.layout.as_words(groups),
            torch.arange(groups.shape[0], device=groups.device),
            self.words(layer),
            rows,
            self.group_words,
        )

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
            copy_rows(
                self.words(layer), src, words(out), torch.arange(len(groups), device=self.device), self.group_words
            )
        return out

    def stats(self) -> dict:
        return {}

    def tier_bytes(self, groups: int) -> dict[str, TierBytes]:
        """Bytes held per tier; ``groups``: the groups (of one layer) the registered sequences have
        opened. Every group in host memory here."""
        return {"host": TierBytes(groups * self.layout.group_bytes * self.layout.num_layers, self.nbytes)}

    def reset_counts(self) -> None:
        pass

    def close(self) -> None:
        pass


class FullHostKV(HostKV):
    affine_rows = True

    def __init__(self, layout: GroupLayout, max_seqs: int, max_groups: int, device: torch.device):
        super().__init__(layout, max_seqs, max_groups, device)
        pin = device.type == "cuda"
        check_host_room(
            layout.num_layers * max_seqs * max_groups * layout.group_bytes,
            f"the KV of {max_seqs} sequences x {max_groups * layout.group_tokens} tokens",
        )
        self.pools = [
            torch.zeros(max_seqs * max_groups, *layout.slot_shape, dtype=layout.dtype, pin_memory=pin)
            for _ in range(layout.num_layers)
        ]  # (S*N, 2, H_kv, G, D) per layer

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.pools)

    def words(self, layer):
        return words(self.pools[layer])

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
