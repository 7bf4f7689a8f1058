"""Triton bodies of the row copy: ``dst[dst_idx[r], :words] = src[src_idx[r], :words]``.

Either side may be pinned host memory: under unified virtual addressing a pinned
tensor's data_ptr is valid on the device, so the kernel reads (or writes) host DRAM
directly over PCIe, one batched launch for any set of groups. Rows are int32 words;
indices come from device tensors, so a decode step's fetch needs no host synchronisation.
The launcher (checks, grid, torch twin) is ``kvdrive.storage.gather.copy_rows``; this
module is imported only when the Triton path runs.
"""

import triton
import triton.language as tl


@triton.jit
def copy_rows_kernel(src_ptr, src_idx_ptr, src_stride, dst_ptr, dst_idx_ptr, dst_stride, words, BLOCK: tl.constexpr):
    """Rows with ``dst_idx[r] >= 0``; others are skipped (their loads are masked off). One program
    per (row, block of words)."""
    row = tl.program_id(0)
    # int64: a host arena or GPU pool may exceed 2**31 words.
    col = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    d = tl.load(dst_idx_ptr + row).to(tl.int64)
    s = tl.load(src_idx_ptr + row).to(tl.int64)
    mask = (col < words) & (d >= 0)
    v = tl.load(src_ptr + s * src_stride + col, mask=mask)
    tl.store(dst_ptr + d * dst_stride + col, v, mask=mask)


@triton.jit
def copy_rows_persistent_kernel(
    src_ptr,
    src_idx_ptr,
    src_stride,
    dst_ptr,
    dst_idx_ptr,
    dst_stride,
    words,
    n_tiles,
    tiles_per_row,
    programs,
    live_ptr,
    BLOCK: tl.constexpr,
    LIVE: tl.constexpr,
):
    """``copy_rows_kernel`` on ``programs`` programs, each looping over (row, block) tiles: the
    copy holds only that many SMs, the others stay free for compute running beside it
    (another micro-batch's layers). With ``LIVE``, only the first ``live_ptr[0]`` rows are
    copied (a compacted miss list: no tile is spent on a row that needs no copy). A while
    loop: the CPU interpreter cannot range() over runtime bounds."""
    if LIVE:
        n_tiles = tl.load(live_ptr).to(tl.int32) * tiles_per_row
    t = tl.program_id(0)
    while t < n_tiles:
        row = t // tiles_per_row
        col = (t % tiles_per_row).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        d = tl.load(dst_idx_ptr + row).to(tl.int64)
        s = tl.load(src_idx_ptr + row).to(tl.int64)
        mask = (col < words) & (d >= 0)
        v = tl.load(src_ptr + s * src_stride + col, mask=mask)
        tl.store(dst_ptr + d * dst_stride + col, v, mask=mask)
        t += programs
