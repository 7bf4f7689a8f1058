"""Geometry of a KV group: what one unit of storage, transfer and caching is.

A group is ``G`` consecutive tokens of one layer, all KV heads, K and V together,
contiguous as ``[K|V][kv_head][G][head_dim]``: a tensor of shape (2, H_kv, G, D).
On the GPU a slot is exactly ``group_bytes``; in host memory and on disk a group is kept
in the storage format ``kv_dtype`` (``kvdrive.quant.formats``: the model dtype, fp8 or
int4) as ``stored_bytes``, in a slot of ``slot_bytes``, rounded up to ``ALIGN`` so that
every slot can be the buffer or the file range of an O_DIRECT transfer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from kvdrive.errors import KvdriveError
from kvdrive.quant.formats import check_kv_dtype, sections, stored_bytes, stored_name

# O_DIRECT needs buffer address, file offset and length aligned to the logical block
# size; 4096 covers every NVMe namespace format in use and the page size.
ALIGN = 4096


def align_up(n: int, alignment: int = ALIGN) -> int:
    return -(-n // alignment) * alignment


class GroupKey(NamedTuple):
    """Address of one group: sequence, layer, and group index (token // G)."""

    seq_id: int
    layer: int
    group: int


@dataclass(frozen=True)
class GroupLayout:
    """Byte geometry of the groups of one model at one dtype and group size."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    group_tokens: int  # G
    kv_dtype: str = "bf16"  # storage format off the GPU; "bf16": the model dtype itself

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "group_tokens"):
            if getattr(self, name) <= 0:
                raise KvdriveError(f"group layout: {name} must be positive, got {getattr(self, name)}")
        if not isinstance(self.dtype, torch.dtype) or self.dtype.is_complex:
            raise KvdriveError(f"group layout: dtype must be a real torch dtype, got {self.dtype!r}")
        check_kv_dtype(self.kv_dtype)
        if self.compressed:
            sections(self.kv_dtype, self.num_kv_heads, self.group_tokens, self.head_dim)  # refuses odd int4 dims

    @classmethod
    def from_config(cls, config, dtype: torch.dtype, group_tokens: int, kv_dtype: str = "bf16") -> GroupLayout:
        """From any object with ``num_hidden_layers``, ``num_key_value_heads`` and ``head_dim``."""
        return cls(
            num_layers=config.num_hidden_layers,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            dtype=dtype,
            group_tokens=group_tokens,
            kv_dtype=kv_dtype,
        )

    @property
    def compressed(self) -> bool:
        """Stored in a format other than the model dtype (fetches dequantize)."""
        return self.kv_dtype != "bf16"

    @property
    def group_shape(self) -> tuple[int, int, int]:
        """(H_kv, G, D), what the storage format's quantizer and dequantizer take."""
        return (self.num_kv_heads, self.group_tokens, self.head_dim)

    @property
    def token_bytes(self) -> int:
        """K and V of one token of one layer, all KV heads."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def group_bytes(self) -> int:
        return self.token_bytes * self.group_tokens

    @property
    def stored_bytes(self) -> int:
        """A group in its storage format: what host and disk slots hold, checksum and transfer."""
        return stored_bytes(self.kv_dtype, *self.group_shape, self.dtype.itemsize)

    @property
    def stored_words(self) -> int:
        """``stored_bytes`` in int32 words (whole: formats pad their sections to 16 bytes)."""
        return self.stored_bytes // 4

    @property
    def slot_bytes(self) -> int:
        """Host and disk slot size: ``stored_bytes`` rounded up to ``ALIGN``."""
        return align_up(self.stored_bytes)

    @property
    def slot_shape(self) -> tuple[int, int, int, int]:
        """(2, H_kv, G, D): K|V, KV head, token in group, head dim."""
        return (2, self.num_kv_heads, self.group_tokens, self.head_dim)

    @property
    def group_words(self) -> int:
        """``group_bytes`` in int32 words (always whole: 2 * itemsize >= 4)."""
        return self.group_bytes // 4

    @property
    def name(self) -> str:
        """Layout named by its dimensions and storage format, e.g. ``kv2-h8-g16-d128-bfloat16``
        (model dtype) or ``kv2-h8-g16-d128-bfloat16-fp8r2`` (format and its byte layout's
        revision): prefix keys and pool geometries carry it, so groups stored in one format,
        or an older layout of it, are never read as another."""
        dt = str(self.dtype).removeprefix("torch.")
        fmt = f"-{stored_name(self.kv_dtype)}" if self.compressed else ""
        return f"kv2-h{self.num_kv_heads}-g{self.group_tokens}-d{self.head_dim}-{dt}{fmt}"

    def groups_for(self, tokens: int) -> int:
        """Full groups in ``tokens`` tokens (the partly filled tail group is not one)."""
        return tokens // self.group_tokens

    def as_groups(self, rows: torch.Tensor) -> torch.Tensor:
        """View byte rows (N, >= group_bytes) uint8 as typed groups (N, 2, H_kv, G, D)
        (rows of the model dtype: GPU pools, and host rows of an uncompressed layout)."""
        n = rows.shape[0]
        return rows[:, : self.group_bytes].view(self.dtype).view(n, *self.slot_shape)

    def as_words(self, groups: torch.Tensor) -> torch.Tensor:
        """View contiguous typed groups (N, 2, H_kv, G, D) as int32 words (N, group_words)."""
        if tuple(groups.shape[1:]) != self.slot_shape or groups.dtype != self.dtype:
            raise ValueError(f"expected (N, {self.slot_shape}) {self.dtype}, got {tuple(groups.shape)} {groups.dtype}")
        if not groups.is_contiguous():
            raise ValueError("group tensor must be contiguous")
        return groups.view(groups.shape[0], -1).view(torch.int32)
