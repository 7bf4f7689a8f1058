"""Triton body of ``SelectionCache.ensure`` (launcher and pure-torch twin: ``kvdrive.tiered.selection_cache``).

The torch version of ``ensure`` is about 60 small kernels per layer and step (gathers,
scatters, a sort, a scan, masks), a large share of a decode layer. Here one program per
sequence does the whole bookkeeping in registers: look the selection up, count,
key the cache slots for eviction, sort them, hand the lowest-keyed slots to the misses in
order, and update the table, owners, stamps and fresh flags. The copy of the missed groups
stays in ``kvdrive.storage.gather.copy_rows``, driven by the miss list this kernel writes:
every sequence's misses packed at the front, their number in a device counter.

Ties sort by slot index (keys are packed above the index), as the torch twin's stable sort
does, so both give the same victims. A per-sequence scratch row carries values between lanes
(the protected-slot marks, then the sorted slot order) across ``debug_barrier``.
"""

import triton
import triton.language as tl


@triton.jit
def ensure_kernel(
    rows_ptr,
    groups_ptr,
    groups_stride,
    listed_ptr,
    src_ptr,
    src_n,
    open_ptr,
    raw_from,
    src_out_ptr,
    scores_ptr,
    scores_stride,
    n_scores,
    table_ptr,
    table_stride,
    owner_ptr,
    stamp_ptr,
    fresh_ptr,
    slot_stride,
    counters_ptr,
    step_ptr,
    scratch_ptr,
    scratch_stride,
    pages_ptr,
    dst_ptr,
    live_ptr,
    P,
    CAP,
    TRASH,
    LOOKAHEAD: tl.constexpr,
    PREFETCH: tl.constexpr,
    COUNTS: tl.constexpr,
    AFFINE: tl.constexpr,
    OPEN: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + b).to(tl.int64)
    p = tl.arange(0, BLOCK_P)
    pm = p < P
    if COUNTS:  # listed: the first count entries
        listed = pm & (p < tl.load(listed_ptr + b))
    else:
        listed = tl.load(listed_ptr + b * P + p, mask=pm, other=0) != 0
    g = tl.load(groups_ptr + b * groups_stride + p, mask=pm, other=0).to(tl.int64)
    if AFFINE:  # slot s owns source rows s*n ..
        src = row * src_n + g
    else:
        src = tl.load(src_ptr + b * P + p, mask=pm, other=-1)
    if OPEN:  # a compressed source: the slot's open group is read from its exact row
        src = tl.where(g == tl.load(open_ptr + row), raw_from + row, src)
    tab = table_ptr + row * table_stride
    own_row = owner_ptr + row * slot_stride
    stamp_row = stamp_ptr + row * slot_stride
    fresh_row = fresh_ptr + row * slot_stride
    cur = tl.load(tab + g, mask=listed, other=-1).to(tl.int64)
    hit = listed & (cur >= 0)
    miss = listed & (cur < 0) & (src >= 0)
    if PREFETCH:
        tl.atomic_add(counters_ptr + 3, tl.sum(miss.to(tl.int64), 0))
    else:
        was_fresh = (tl.load(fresh_row + cur, mask=hit, other=0) != 0) & hit
        tl.atomic_add(counters_ptr + 0, tl.sum(hit.to(tl.int64), 0))
        tl.atomic_add(counters_ptr + 1, tl.sum(was_fresh.to(tl.int64), 0))
        tl.atomic_add(counters_ptr + 2, tl.sum(miss.to(tl.int64), 0))
    # Slots holding a group of this selection are protected: mark them through the scratch row.
    c = tl.arange(0, BLOCK_C)
    cm = c < CAP
    scr = scratch_ptr + row * scratch_stride
    tl.store(scr + c, tl.zeros([BLOCK_C], dtype=tl.int64))
    tl.debug_barrier()
    tl.store(scr + cur, tl.full([BLOCK_P], 1, tl.int64), mask=hit)
    tl.debug_barrier()
    protect = tl.load(scr + c) != 0
    own = tl.load(own_row + c, mask=cm, other=-1)
    in_use = own >= 0
    if LOOKAHEAD:
        col = tl.minimum(tl.maximum(own, 0), n_scores - 1)
        key = tl.load(scores_ptr + b * scores_stride + col, mask=cm & in_use, other=0.0)
    else:
        key = tl.load(stamp_row + c, mask=cm, other=0.0)
    key = tl.where(in_use, key, float("-inf"))
    key = tl.where(in_use & protect, float("inf"), key)
    key = tl.where(key == 0.0, 0.0, key)  # -0.0 and 0.0 tie, as in torch
    bits = key.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)  # monotone in the float
    packed = (ordered << 32) | c.to(tl.int64)
    packed = tl.where(cm, packed, 0x7FFFFFFFFFFFFFFF)  # padding sorts last
    order = tl.sort(packed) & 0xFFFFFFFF  # slots, lowest key first; ties by index
    tl.debug_barrier()  # every lane has read its protect mark
    tl.store(scr + c, order)
    tl.debug_barrier()
    rank = tl.minimum(tl.maximum(tl.cumsum(miss.to(tl.int32), 0) - 1, 0), CAP - 1)
    victim = tl.load(scr + rank, mask=miss, other=CAP)
    old = tl.load(own_row + victim, mask=miss, other=-1)
    tl.store(tab + old, tl.full([BLOCK_P], -1, tl.int32), mask=miss & (old >= 0))
    tl.store(tab + g, victim.to(tl.int32), mask=miss)
    tl.store(own_row + victim, g, mask=miss)
    slot = tl.maximum(tl.where(miss, victim, cur), 0)
    step = tl.load(step_ptr)
    tl.store(stamp_row + slot, tl.zeros([BLOCK_P], dtype=tl.float32) + step, mask=listed)
    tl.store(fresh_row + victim, tl.full([BLOCK_P], PREFETCH, tl.uint8), mask=miss)
    if not PREFETCH:
        tl.store(fresh_row + slot, tl.zeros([BLOCK_P], dtype=tl.uint8), mask=hit)
    pages = tl.where(listed, row * CAP + slot, TRASH)
    tl.store(pages_ptr + b * P + p, pages.to(tl.int32), mask=pm)
    # The misses, compacted: sequences take turns on the shared count; each writes its misses
    # in order at the count it got, so the copy loops over misses only.
    at = tl.atomic_add(live_ptr, tl.sum(miss.to(tl.int32), 0)) + tl.cumsum(miss.to(tl.int32), 0) - 1
    tl.store(src_out_ptr + at, src, mask=miss)
    tl.store(dst_ptr + at, row * CAP + victim, mask=miss)
