"""Batched row copies between tiers: ``dst[dst_idx[r], :words] = src[src_idx[r], :words]``.

Rows are int32 words (a group is ``layout.group_words`` of them; ``words`` views a pool so).
``copy_rows`` is the one row copy of kvdrive, for any set of groups between any two of
{pinned host arena, GPU pool, caller tensor}, with indices as device tensors:

* ``triton``: one kernel launch (``gather_triton``); reads or writes pinned host memory in
  place through unified addressing (no staging copy, no per-group work); a negative
  destination index skips its row (a cache hit costs no PCIe traffic);
* ``torch``: the pure-torch twin (``copy_rows_reference``); the CPU path, and what tests
  compare the kernel to.

``RowCopier`` takes index lists (the prefix pool's load and store) and adds a fallback for
CUDA without Triton: ``index_select`` into a pinned staging buffer, then one large
non_blocking copy and one ``index_copy_`` on the device (reverse order for device -> host).
Copies run on the caller's current stream.
"""

from __future__ import annotations

import torch

from kvdrive import device as dev
from kvdrive.device import triton_available
from kvdrive.errors import KvdriveError
from kvdrive.rows import live_rows, row_args

IMPLS = ("auto", "triton", "torch")
METHODS = ("auto", "triton", "staging", "torch")
DEFAULT_BLOCK = 2048  # int32 words per program: 8 KiB, 4 x 16 B vectors per thread at 4 warps


def words(rows: torch.Tensor) -> torch.Tensor:
    """A pool as int32 word rows (R, row_words): typed (R, 2, H_kv, G, D) contiguous, or byte rows
    (R, row_bytes) uint8 (the host arena, whose rows are padded to 4 KiB)."""
    return rows.view(rows.shape[0], -1).view(torch.int32)


def copy_rows_reference(
    src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor, n_words: int
) -> None:
    """The torch twin of ``copy_rows``: plain indexing, across devices if need be (synchronous)."""
    keep = dst_idx >= 0
    rows = src[src_idx[keep].to(src.device), :n_words]  # (n, words)
    dst[dst_idx[keep].to(dst.device), :n_words] = rows.to(dst.device)


def copy_rows(
    src: torch.Tensor,
    src_idx: torch.Tensor,
    dst: torch.Tensor,
    dst_idx: torch.Tensor,
    n_words: int,
    impl: str = "auto",
    programs: int = 0,
    block: int = DEFAULT_BLOCK,
    live: torch.Tensor | None = None,
) -> None:
    """``dst[dst_idx[r], :n_words] = src[src_idx[r], :n_words]`` on int32 word rows (see ``words``);
    src_idx, dst_idx (M,) int64 where the kernel runs (the destination's device, or CPU under
    TRITON_INTERPRET); ``dst_idx[r] < 0`` skips row r. ``impl="auto"``: the kernel when one side
    is pinned host memory seen from CUDA (torch cannot index it there), else torch.
    ``programs``: 0 launches a program per (row, block); N > 0 that many looping programs (the
    copy then occupies at most N SMs). ``live``: a (1,) int32 tensor on the indices' device;
    only the first ``live[0]`` rows are copied and the rest of the indices are never read
    (the count stays on the device: no host sync)."""
    if impl == "auto":
        impl = "triton" if {src.device.type, dst.device.type} == {"cuda", "cpu"} else "torch"
    if impl == "torch":
        copy_rows_reference(src, src_idx, dst, live_rows(dst_idx, live), n_words)
        return
    import triton

    from kvdrive.storage.gather_triton import copy_rows_kernel, copy_rows_persistent_kernel

    n = src_idx.numel()
    if n == 0:
        return
    grid = (n, triton.cdiv(n_words, block))
    if programs > 0 or live is not None:
        n_tiles = grid[0] * grid[1]
        programs = programs if 0 < programs < n_tiles else n_tiles
        copy_rows_persistent_kernel[(programs,)](
            *row_args(src, src_idx, dst, dst_idx),
            n_words,
            n_tiles,
            grid[1],
            programs,
            live if live is not None else dst_idx,  # unread without a count
            BLOCK=block,
            LIVE=live is not None,
        )
        return
    copy_rows_kernel[grid](*row_args(src, src_idx, dst, dst_idx), n_words, BLOCK=block)


def check_rows(
    src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor, n_words: int
) -> None:
    """What the kernel assumes of its operands (``copy_rows`` itself does not check: it runs
    on the decode step's path)."""
    if dst_idx.numel() != src_idx.numel():
        raise ValueError(f"{src_idx.numel()} source rows but {dst_idx.numel()} destination rows")
    for name, t in (("src", src), ("dst", dst)):
        if t.dtype != torch.int32 or t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"{name} must be 2-D int32 rows with unit column stride, got {t.dtype} {tuple(t.shape)}")
        if t.shape[1] < n_words:
            raise ValueError(f"{name} rows have {t.shape[1]} words, {n_words} to copy")


def _device_visible(t: torch.Tensor) -> bool:
    """Device memory, or pinned host memory (mapped into the device's address space)."""
    return t.device.type == "cuda" or (t.device.type == "cpu" and t.is_pinned())


class RowCopier:
    """``copy_rows`` with index lists, by one resolved method; owns the pinned staging buffer of
    the fallback.

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
            check_rows(src, sidx, dst, didx, words)
            copy_rows(
                src,
                sidx.to(self.device, non_blocking=True),
                dst,
                didx.to(self.device, non_blocking=True),
                words,
                impl="triton",
                block=self.block,
            )
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
