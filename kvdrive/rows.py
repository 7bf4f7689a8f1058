"""What the row kernels share (``storage.gather.copy_rows``, ``quant.dequant.dequant_rows``):
their leading launch arguments and the reading of a packed row list's device count. Depends
on nothing but torch, so both layers import it (storage builds on quant)."""

from __future__ import annotations

import torch


def row_args(src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor) -> tuple:
    """The row kernels' leading arguments."""
    return src, src_idx, src.stride(0), dst, dst_idx, dst.stride(0)


def live_rows(dst_idx: torch.Tensor, live: torch.Tensor | None) -> torch.Tensor:
    """``dst_idx`` with the rows past the first ``live[0]`` skipped (-1): the twins' reading of a
    count (no host sync; the indices past it may be garbage)."""
    if live is None:
        return dst_idx
    keep = torch.arange(dst_idx.numel(), device=dst_idx.device) < live.to(dst_idx.device)
    return torch.where(keep, dst_idx, -1)
