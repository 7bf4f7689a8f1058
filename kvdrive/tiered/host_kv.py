"""Where the tiered cache keeps every group: the ``HostKV`` interface, and all of it in
pinned host memory (``FullHostKV``).

``HostKV`` is what ``TieredSparseKVCache`` reads misses from. ``rows`` maps (sequence slot,
group) to a row of the layer's host pool on the device (-1: on disk only), so the GPU
fetch kernel needs no host work. With a compressed ``layout.kv_dtype`` (fp8, int8, int4) full
groups are stored in the format and each slot's open group is an exact row of
``opened`` (``OpenGroups``, below): token writes go there, ``seal`` quantizes it on
the device into the group's row once the group is full, and ``rows`` names the open
group by its raw row (``StoredRows.raw_from`` + slot). Two implementations:

* ``FullHostKV`` (here): one pinned pool per layer with a row for every group of every
  sequence slot (row = slot * N + group). Nothing can miss.
* ``DiskBackedHostKV`` (``disk_host_kv.py``): a pinned arena per layer in front of the disk pool.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import numpy as np
import torch

from kvdrive.cache.base import TierBytes
from kvdrive.device import host_zeros
from kvdrive.errors import CapacityError
from kvdrive.quant.dequant import dequant_rows
from kvdrive.quant.formats import quantize
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


class StoredRows(NamedTuple):
    """A compressed host tier's layer as a fetch source."""

    rows: torch.Tensor  # (R, row_bytes) uint8: stored groups
    raw: torch.Tensor  # (S, 2*H*G*D) model dtype: each sequence slot's open group, exact
    raw_from: int  # source index of slot 0's open row (R: past the stored rows)
    open: torch.Tensor  # (S,) int64 on the device: each slot's open group
    kv_dtype: str
    shape: tuple[int, int, int]  # (H_kv, G, D)


class OpenGroups:
    """Open-group rows (L, S, 2, H_kv, G, D) in pinned memory (host memory off CUDA), and the
    open group of each slot: ``open`` on the device (read by fetches), mirrored in numpy so
    that only changes are uploaded (a decode step changes nothing but after a seal)."""

    def __init__(self, layout: GroupLayout, max_seqs: int, device: torch.device):
        self.layout, self.max_seqs, self.device = layout, max_seqs, device
        self.rows = host_zeros(
            (layout.num_layers, max_seqs, *layout.slot_shape), layout.dtype, device.type == "cuda"
        )  # (L, S, 2, H_kv, G, D)
        self._words = words(self.rows.view(-1, *layout.slot_shape))  # (L*S, group_words)
        self.open = torch.zeros(max_seqs, dtype=torch.int64, device=device)
        self._open_np = np.zeros(max_seqs, dtype=np.int64)

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

    def typed(self, layer: int) -> torch.Tensor:
        """(S, 2, H_kv, G, D): the layer's open rows, row = sequence slot (token writes' target)."""
        return self.rows[layer]

    def raw(self, layer: int) -> torch.Tensor:
        """(S, 2*H*G*D): the layer's open rows as a fetch's raw source."""
        return self.rows[layer].view(self.max_seqs, -1)

    def set(self, slot_list, groups) -> None:
        """Slot ``slot_list[i]``'s open group is ``groups[i]`` from now on (uploads only changes)."""
        slots, groups = np.asarray(slot_list, dtype=np.int64), np.asarray(groups, dtype=np.int64)
        moved = self._open_np[slots] != groups
        if not moved.any():
            return
        self._open_np[slots[moved]] = groups[moved]
        up = torch.from_numpy(np.stack((slots[moved], groups[moved])))
        if self.device.type == "cuda":  # pinned: a pageable copy would wait for the step in flight
            up = up.pin_memory().to(self.device, non_blocking=True)
        self.open[up[0]] = up[1]

    def redirect(self, raw_from: int, slots: torch.Tensor, groups: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Source rows (B, P) of ``groups`` (B, P) of ``slots`` (B,): the open row past ``raw_from``
        where a group is its slot's open group, ``rows`` elsewhere."""
        is_open = groups == self.open[slots][:, None]
        return torch.where(is_open, raw_from + slots[:, None], rows)

    def gather(self, layers, slots: torch.Tensor) -> torch.Tensor:
        """The open groups of ``slots`` (n,) int64 (on the device) in ``layers``, copied to the
        device: (len(layers), n, 2, H_kv, G, D)."""
        layers_t = torch.as_tensor(list(layers), device=self.device, dtype=torch.int64)
        src = (layers_t[:, None] * self.max_seqs + slots[None, :]).reshape(-1)
        out = torch.empty(src.numel(), *self.layout.slot_shape, device=self.device, dtype=self.layout.dtype)
        copy_rows(self._words, src, words(out), torch.arange(src.numel(), device=self.device), self.layout.group_words)
        return out.view(len(layers_t), slots.numel(), *self.layout.slot_shape)


class HostKV(ABC):
    may_miss: bool = False  # True: ``rows`` can return -1 and ``resolve`` must run before a fetch
    affine_rows: bool = False  # True: ``rows`` is slot * n + group in every layer (never -1)

    def __init__(self, layout: GroupLayout, max_seqs: int, max_groups: int, device: torch.device):
        self.layout, self.max_seqs, self.n, self.device = layout, max_seqs, max_groups, device
        self.group_words = layout.group_words
        self.compressed = layout.compressed
        # compressed: each slot's open group, exact (token writes' target until it is sealed)
        self.opened = OpenGroups(layout, max_seqs, device) if self.compressed else None
        self.fetch_bytes = layout.stored_bytes  # bytes a fetch of one group reads from host memory
        self.raw_from = 0  # compressed: source index of slot 0's open row (set by the implementation)

    @abstractmethod
    def words(self, layer: int) -> torch.Tensor:
        """The layer's host pool as int32 word rows (a fetch's source where uncompressed)."""

    @abstractmethod
    def typed(self, layer: int) -> torch.Tensor:
        """The layer's host pool as (R, 2, H_kv, G, D) (rows may be padded); uncompressed only."""

    @abstractmethod
    def group_rows(self, layer: int, slots: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """slots (B,), groups (B, P) int64 on the device -> the groups' own host rows (B, P) int64,
        -1 if on disk only (a compressed tier's open group: the row it is sealed into)."""

    def rows(self, layer: int, slots: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """slots (B,), groups (B, P) int64 on the device -> the rows a read takes them from (B, P)
        int64, -1 if on disk only; a compressed tier's open group is read from its raw row."""
        rows = self.group_rows(layer, slots, groups)
        return rows if self.opened is None else self.opened.redirect(self.raw_from, slots, groups, rows)

    def stored_rows(self, layer: int) -> torch.Tensor:
        """The layer's host pool as (R, row_bytes) uint8 rows (a compressed tier's stored groups)."""
        return self.words(layer).view(torch.uint8)

    def fetch_source(self, layer: int):
        """What the selection cache's fetch reads ``rows`` from: the word rows (uncompressed), or
        ``StoredRows`` (compressed: stored groups, widened on the device, and the open rows)."""
        if self.opened is None:
            return self.words(layer)
        lay = self.layout
        return StoredRows(
            self.stored_rows(layer),
            self.opened.raw(layer),
            self.raw_from,
            self.opened.open,
            lay.kv_dtype,
            lay.group_shape,
        )

    def begin(self, slot_list: list[int], starts: tuple[int, ...], num_new: int) -> None:
        """Before a forward: every group the new tokens land in has a host row."""
        self._open(slot_list, starts, num_new)

    def _open(self, slot_list, starts, num_new: int) -> None:
        """Compressed: the open group of each slot during this forward. A decode token's group
        (sealed after the step, if it fills); a prefill chunk seals the groups it fills as it
        writes them, so what stays open is the group after its last token."""
        if self.opened is not None:
            g = self.layout.group_tokens
            self.opened.set(slot_list, [st // g if num_new == 1 else (st + num_new) // g for st in starts])

    def seal(self, layers: list[int], slots: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed: the open groups of ``slots`` (n,) are full as groups ``groups`` (n,) (int64,
        on the device) in ``layers``: copied to the device, quantized there and written into the
        groups' rows. Returns (exact (len(layers), n, 2, H_kv, G, D), stored (len(layers), n,
        stored_bytes) uint8), both on the device (summaries take the exact keys)."""
        exact = self.opened.gather(layers, slots)
        stored = quantize(exact.view(-1, *self.layout.slot_shape), self.layout.kv_dtype).view(
            len(layers), slots.numel(), -1
        )
        self._store(layers, slots, groups, stored)
        return exact, stored

    def _store(self, layers: list[int], slots: torch.Tensor, groups: torch.Tensor, stored: torch.Tensor) -> None:
        """Stored rows (len(layers), n, stored_bytes) uint8 on the device into the groups' host rows."""
        n = slots.numel()
        for i, layer in enumerate(layers):
            dst = self.group_rows(layer, slots, groups[:, None])[:, 0]
            copy_rows(
                words(stored[i]), torch.arange(n, device=self.device), self.words(layer), dst, self.layout.stored_words
            )

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
        host rows (a prefill: row-sized copies, not one 2 x D-element write per token); a
        compressed tier quantizes them on the device first."""
        rows = self.group_rows(
            layer,
            torch.tensor([slot], device=self.device),
            torch.arange(first, first + groups.shape[0], device=self.device)[None],
        )[0]
        if self.compressed:
            src, n_words = words(quantize(groups, self.layout.kv_dtype)), self.layout.stored_words
        else:
            src, n_words = self.layout.as_words(groups), self.group_words
        copy_rows(src, torch.arange(groups.shape[0], device=groups.device), self.words(layer), rows, n_words)

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
            dst = torch.arange(len(groups), device=self.device)
            if self.compressed:
                s = self.fetch_source(layer)
                dequant_rows(
                    s.rows, src, out.view(len(groups), -1), dst, s.kv_dtype, s.shape, raw=s.raw, raw_from=s.raw_from
                )
            else:
                copy_rows(self.words(layer), src, words(out), dst, self.group_words)
        return out

    def stats(self) -> dict:
        return {}

    def tier_bytes(self, groups: int) -> dict[str, TierBytes]:
        """Bytes held per tier; ``groups``: the groups (of one layer) the registered sequences have
        opened. Every group in host memory here."""
        return {"host": TierBytes(groups * self.layout.stored_bytes * self.layout.num_layers, self.nbytes)}

    def reset_counts(self) -> None:
        pass

    def close(self) -> None:
        pass


class FullHostKV(HostKV):
    """Uncompressed: a typed pool per layer (S*N, 2, H_kv, G, D). Compressed: one pool of stored
    rows (L, S*N, stored_bytes) uint8 (no slot padding: nothing here is read by O_DIRECT), the
    open rows past them (``raw_from`` = S*N)."""

    affine_rows = True

    def __init__(self, layout: GroupLayout, max_seqs: int, max_groups: int, device: torch.device):
        super().__init__(layout, max_seqs, max_groups, device)
        pin = device.type == "cuda"
        rows = max_seqs * max_groups
        open_bytes = self.opened.nbytes if self.opened is not None else 0
        check_host_room(
            layout.num_layers * rows * layout.stored_bytes + open_bytes,
            f"the KV of {max_seqs} sequences x {max_groups * layout.group_tokens} tokens",
        )
        self.raw_from = rows
        if self.compressed:
            self.stored = host_zeros((layout.num_layers, rows, layout.stored_bytes), torch.uint8, pin)
            self._all_words = words(self.stored.view(-1, layout.stored_bytes))  # (L*S*N, stored_words)
            self.pools = []
        else:
            self.pools = [
                host_zeros((rows, *layout.slot_shape), layout.dtype, pin) for _ in range(layout.num_layers)
            ]  # (S*N, 2, H_kv, G, D) per layer

    @property
    def nbytes(self) -> int:
        if self.compressed:
            return self.stored.numel() + self.opened.nbytes
        return sum(p.numel() * p.element_size() for p in self.pools)

    def words(self, layer):
        return words(self.stored[layer] if self.compressed else self.pools[layer])

    def typed(self, layer):
        return self.pools[layer]

    def group_rows(self, layer, slots, groups):
        return slots[:, None] * self.n + groups

    def _store(self, layers, slots, groups, stored):
        layers_t = torch.as_tensor(layers, device=self.device, dtype=torch.int64)
        dst = (layers_t[:, None] * self.raw_from + slots[None, :] * self.n + groups[None, :]).reshape(-1)
        flat = words(stored.reshape(-1, stored.shape[-1]))
        copy_rows(flat, torch.arange(dst.numel(), device=self.device), self._all_words, dst, self.layout.stored_words)

    def put(self, layer, slot, first, groups):
        if self.compressed:
            return super().put(layer, slot, first, groups)
        base = slot * self.n + first  # a sequence's groups are consecutive rows: one DMA
        self.pools[layer][base : base + groups.shape[0]].copy_(groups, non_blocking=True)

    def gather(self, layer, slot, groups):
        if not self.compressed and groups and groups == list(range(groups[0], groups[0] + len(groups))):
            base = slot * self.n + groups[0]  # one contiguous DMA
            return self.pools[layer][base : base + len(groups)].to(self.device, non_blocking=True)
        return super().gather(layer, slot, groups)
