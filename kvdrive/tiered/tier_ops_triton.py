"""Triton bodies of the tiered cache's data movement (launchers: ``kvdrive.tiered.tier_ops``).

The kernels take their indices from device tensors, so a decode step writes KV to pinned
host memory and the GPU cache without a host synchronisation. Pinned host memory is
reached through unified virtual addressing (its data_ptr is valid on the device).
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T"])  # a chunk of any length: one compiled kernel
def write_tokens_kernel(
    k_ptr,
    v_ptr,
    dst_ptr,
    row_stride,
    row_ptr,
    off_ptr,
    T,
    H,
    G,
    sk_b,
    sk_h,
    sk_t,
    sv_b,
    sv_h,
    sv_t,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Token (b, t) of k/v (B, H, T, D) (any strides, unit in D) -> group row ``row[b, t]``,
    offset ``off[b, t]`` of a pool (R, 2, H, G, D) whose rows are ``row_stride`` elements
    apart. One program per (token, head)."""
    bt = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    b = bt // T
    t = bt % T
    row = tl.load(row_ptr + bt).to(tl.int64)
    off = tl.load(off_ptr + bt).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m = d < D
    kk = tl.load(k_ptr + b * sk_b + h * sk_h + t * sk_t + d, mask=m)
    vv = tl.load(v_ptr + b * sv_b + h * sv_h + t * sv_t + d, mask=m)
    base = row * row_stride + h * G * D + off * D
    tl.store(dst_ptr + base + d, kk, mask=m)
    tl.store(dst_ptr + base + H * G * D + d, vv, mask=m)


@triton.jit
def append_token_kernel(
    k_ptr,
    v_ptr,
    sk_b,
    sk_h,
    sv_b,
    sv_h,
    off_ptr,
    host_ptr,
    host_stride,
    host_row_ptr,
    cache_ptr,
    cache_stride,
    table_ptr,
    table_stride,
    slot_ptr,
    group_ptr,
    CAP,
    TRASH,
    H,
    G,
    HAS_CACHE: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """A decode token's k/v (B, H, 1, D) of sequence b into its host row ``host_row[b]`` and, with
    ``HAS_CACHE``, into the GPU cache's copy of its open group (pool row ``slot * CAP + table[slot,
    group]``, the trash row when the group is not cached), at offset ``off[b]``. One program per
    (sequence, head); both pools are (R, 2, H, G, D) with rows ``*_stride`` elements apart."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m = d < D
    off = tl.load(off_ptr + b).to(tl.int64)
    kk = tl.load(k_ptr + b * sk_b + h * sk_h + d, mask=m)
    vv = tl.load(v_ptr + b * sv_b + h * sv_h + d, mask=m)
    inner = h * G * D + off * D + d
    base = tl.load(host_row_ptr + b).to(tl.int64) * host_stride + inner
    tl.store(host_ptr + base, kk, mask=m)
    tl.store(host_ptr + base + H * G * D, vv, mask=m)
    if HAS_CACHE:
        slot = tl.load(slot_ptr + b).to(tl.int64)
        c = tl.load(table_ptr + slot * table_stride + tl.load(group_ptr + b)).to(tl.int64)
        row = tl.where(c >= 0, slot * CAP + c, TRASH)
        tl.store(cache_ptr + row * cache_stride + inner, kk, mask=m)
        tl.store(cache_ptr + row * cache_stride + inner + H * G * D, vv, mask=m)


@triton.jit
def defer_split_kernel(
    groups_ptr,
    g_sb,
    g_sp,
    num_pages_ptr,
    slots_ptr,
    map_ptr,
    map_stride,
    table_ptr,
    table_stride,
    kept_ptr,
    kept_pages_ptr,
    src_ptr,
    flags_ptr,
    P,
    BLOCK_P: tl.constexpr,
):
    """One sequence's selection of a deferred-miss step (``tier_ops.defer_split``): flags of
    each listed group, and the groups the GPU cache or the arena holds compacted to the
    front in their order, with their arena rows. One program per sequence."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK_P)
    inb = p < P
    listed = inb & (p < tl.load(num_pages_ptr + b))
    g = tl.load(groups_ptr + b * g_sb + p * g_sp, mask=inb, other=0).to(tl.int64)
    s = tl.load(slots_ptr + b).to(tl.int64)
    row = tl.load(map_ptr + s * map_stride + g, mask=listed, other=-1)
    cached = tl.load(table_ptr + s * table_stride + g, mask=listed, other=-1) >= 0
    keep = listed & (cached | (row >= 0))
    left = listed.to(tl.int32) - keep.to(tl.int32)  # 1: listed, on disk only, not cached
    tl.store(flags_ptr + b * P + p, (listed.to(tl.int32) | (left << 1)).to(tl.uint8), mask=inb)
    k32 = keep.to(tl.int32)
    n_keep = tl.sum(k32, axis=0)
    rest = inb.to(tl.int32) - k32
    pos = tl.where(keep, tl.cumsum(k32, axis=0) - 1, n_keep + tl.cumsum(rest, axis=0) - 1)
    tl.store(kept_ptr + b * P + pos, g.to(tl.int32), mask=inb)
    tl.store(src_ptr + b * P + pos, row, mask=inb)
    tl.store(kept_pages_ptr + b, n_keep)
