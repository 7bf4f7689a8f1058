"""Batched row copies between tiers: ``dst[dst_idx[r], :words] = src[src_idx[r], :words]``.

Rows are int32 words (a group is ``layout.group_words`` of them). One call moves any
set of groups between any two of {pinned host arena, GPU slot pool, caller tensor}:

* ``triton``: one kernel launch; reads/writes pinned host memory in place through
  unified addressing (no staging copy, no per-group work);
* ``staging``: the fallback without Triton: ``index_select`` into a pinned staging
  buffer, then one large non_blocking copy and one ``index_copy_`` on the device
  (reverse order for device -> host);
* ``torch``: the pure-torch reference twin; the CPU path, and what tests compare to.

Copies run on the caller's current stream; the store puts them on its side stream.
"""

from __future__ import annotations

import torch

from kvdrive import device as dev
from kvdrive.device import triton_available
from kvdrive.errors import KvdriveError

METHODS = ("auto", "triton", "staging", "torch")
DEFAULT_BLOCK = 2048  # int32 words per program: 8 KiB, 4 x 16 B vectors per thread at 4 warps
DEFAULT_WARPS = 4


def copy_rows_reference(src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor,
                        words: int) -> None:
    """Reference twin: plain indexing, across devices if need be (synchronous)."""
    rows = src[src_idx.to(src.device), :words]  # (n, words)
    dst[dst_idx.to(dst.device), :words] = rows.to(dst.device)


def copy_rows_triton(src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor,
                     words: int, block: int = DEFAULT_BLOCK, num_warps: int = DEFAULT_WARPS) -> None:
    """Launch the kernel; indices must be int64 where the kernel runs (GPU, or CPU under TRITON_INTERPRET)."""
    import triton

    from kvdrive.storage.gather_triton import copy_rows_kernel

    n = src_idx.numel()
    if dst_idx.numel() != n:
        raise ValueError(f"{n} source rows but {dst_idx.numel()} destination rows")
    for name, t in (("src", src), ("dst", dst)):
        if t.dtype != torch.int32 or t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"{name} must be 2-D int32 rows with unit column stride, got {t.dtype} {tuple(t.shape)}")
        if t.shape[1] < words:
            raise ValueError(f"{name} rows have {t.shape[1]} words, {words} to copy")
    if src_idx.dtype != torch.int64 or dst_idx.dtype != torch.int64:
        raise ValueError("indices must be int64")
    if n == 0:
        return
    grid = (n, triton.cdiv(words, block))
    copy_rows_kernel[grid](src, src_idx, src.stride(0), dst, dst_idx, dst.stride(0), words,
                           BLOCK=block, num_warps=num_warps)


def _device_visible(t: torch.Tensor) -> bool:
    """Device memory, or pinned host memory (mapped into the device's address space)."""
    return t.device.type == "cuda" or (t.device.type == "cpu" and t.is_pinned())


class RowCopier:
    """Runs one resolved method; owns the pinned staging buffer of the fallback.

    ``copy`` is asynchronous w.r.t. the host on CUDA (except staging device->host,
    which waits for its copy); the staging buffer is reused only after the copy that
    last read it has finished.
    """

    def __init__(self, device: torch.device, method: str = "auto", block: int = DEFAULT_BLOCK):
        if method not in METHODS:
            raise KvdriveError(f"copy method must be one of {METHODS}, got {method!r}")
        if device.type != "cuda":
            method = "torch"
        elif method == "auto":
            method = "triton" if triton_available() else "staging"
        self.device = device
        self.method = method
        self.block = block
        self._staging: torch.Tensor | None = None
        self._staging_done = dev.new_event(device)

    def copy(self, src: torch.Tensor, src_idx: list[int], dst: torch.Tensor, dst_idx: list[int], words: int) -> None:
        if not src_idx:
            return
        sidx = torch.tensor(src_idx, dtype=torch.int64)
        didx = torch.tensor(dst_idx, dtype=torch.int64)
        if self.method == "torch" or not (_device_visible(src) and _device_visible(dst)):
            copy_rows_reference(src, sidx, dst, didx, words)
        elif self.method == "triton":
            copy_rows_triton(src, sidx.to(self.device, non_blocking=True), dst,
                             didx.to(self.device, non_blocking=True), words, self.block)
        elif src.device.type == "cpu":
            self._staged_h2d(src, sidx, dst, didx.to(self.device, non_blocking=True), words)
        elif dst.device.type == "cpu":
            rows = src.index_select(0, sidx.to(self.device))[:, :words]  # (n, words) on the GPU
            dst[didx, :words] = rows.cpu()
        else:
            copy_rows_reference(src, sidx, dst, didx, words)

    def _staged_h2d(self, src, sidx, dst, didx, words) -> None:
        n = sidx.numel()
        if self._staging is None or self._staging.shape[0] < n or self._staging.shape[1] != words:
            self._staging_done.synchronize()
            self._staging = torch.empty((n, words), dtype=torch.int32, pin_memory=dev.pin_supported())
        self._staging_done.synchronize()  # the previous non_blocking copy has read it
        stage = self._staging[:n]  # (n, words) pinned
        torch.index_select(src[:, :words], 0, sidx, out=stage)
        dst[:, :words].index_copy_(0, didx, stage.to(self.device, non_blocking=True))
        self._staging_done.record()
