"""Triton body of the row copy: ``dst[dst_idx[r], :words] = src[src_idx[r], :words]``.

Either side may be pinned host memory: under unified virtual addressing a pinned
tensor's data_ptr is valid on the device, so the kernel reads (or writes) host DRAM
directly over PCIe, one batched launch for any set of groups. Rows are int32 words.
The launcher (checks, grid, fallback) is ``kvdrive.storage.gather``; this module is imported
only when the Triton path runs.
"""

import triton
import triton.language as tl


@triton.jit
def copy_rows_kernel(src_ptr, src_idx_ptr, src_stride, dst_ptr, dst_idx_ptr, dst_stride, words,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < words
    # int64: a host arena or GPU pool may exceed 2**31 words.
    s = tl.load(src_idx_ptr + row).to(tl.int64)
    d = tl.load(dst_idx_ptr + row).to(tl.int64)
    v = tl.load(src_ptr + s * src_stride + col, mask=mask)
    tl.store(dst_ptr + d * dst_stride + col, v, mask=mask)
