"""The open groups of a compressed host tier (``kv_dtype`` fp8 or int4), and what a fetch reads.

A stored group is quantized over its G tokens, so it cannot take tokens one at a time. Each
sequence slot has one exact open-group row per layer, in pinned memory of the model dtype:
decode's ``append_token`` and a prefill's partial groups write there. When the group fills,
it is sealed (``HostKV.seal``): the open rows are copied to the device, quantized there and
written as the group's stored row; the next group reuses the open row.

``StoredRows`` is what the selection cache's fetch reads: the stored rows of a layer, its open
rows as a raw source past ``raw_from``, and ``open``, each slot's open group on the device, by
which the fetch redirects the open group's source row (slot s reads raw row ``raw_from + s``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from kvdrive.storage.gather import copy_rows, words
from kvdrive.storage.layout import GroupLayout


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
        self.rows = torch.zeros(
            layout.num_layers, max_seqs, *layout.slot_shape, dtype=layout.dtype, pin_memory=device.type == "cuda"
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
