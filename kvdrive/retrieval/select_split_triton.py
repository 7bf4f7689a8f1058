"""Shared-mode selection with many programs per sequence, for long rows (launcher:
``kvdrive.retrieval.select._select_split``; one-program twin: ``select_triton``).

NOTE: one program per sequence is latency bound on long rows, and inside the pipelined decode
it shares the SMs with the fetch kernel and the other micro-batch while it sits on each
layer's critical path (the next fetch waits for it). Here each sequence's row is cut into
chunks of ``CHUNK`` groups, one program each, in five steps:

1. ``split_stats_kernel``: per chunk and KV head, the max and the sum of exp of the raw
   scores (the lookahead key's softmax) and of the candidates (the mass's softmax).
2. ``split_mass_kernel``: the chunks' stats combine into each head's softmax; the chunk
   writes its key and its groups' order keys (``_ordered``), and counts the top byte of
   those keys into the sequence's histogram (atomics).
3. ``split_hist_kernel`` (passes 1-3): the threshold's bytes so far are read off the
   histograms of the passes before; the groups that share them count their next byte.
4. ``split_count_kernel``: per chunk, the groups above the threshold and at it.
5. ``split_write_kernel``: each chunk writes its groups at the offset the chunks before
   it fill; ties go to the lower index, as in the one-program kernel.

The same groups as ``select_shared_kernel`` (tests/retrieval/test_select.py), in the same order.
Seven launches cost more than a short row saves, so only rows above ``SPLIT_MIN_GROUPS`` split
(the timings: docs/attention.md).
"""

import triton
import triton.language as tl

from kvdrive.retrieval.select_triton import _budget, _candidates, _finite, _masks, _ordered

NUM_BINS = 256  # one byte of the 32-bit order key per histogram pass
BINS = tl.constexpr(NUM_BINS)


@triton.jit
def _max2(a1, b1, a2, b2):
    return tl.maximum(a1, a2), tl.maximum(b1, b2)


@triton.jit
def _add2(a1, b1, a2, b2):
    return a1 + a2, b1 + b2


@triton.jit
def split_stats_kernel(
    scores_ptr,
    s_stride_b,
    s_stride_h,
    num_groups_ptr,
    stats_ptr,
    hist_ptr,
    N,
    P,
    budget_groups,
    n_sink,
    n_window,
    floor,
    H: tl.constexpr,
    CHUNK: tl.constexpr,
):
    b, c = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    n_chunks = tl.num_programs(1)
    if c == 0:  # the sequence's four histograms start at zero (no memset launch before the next kernels)
        tl.store(hist_ptr + b * 4 * BINS + tl.arange(0, 4 * BINS), tl.zeros([4 * BINS], dtype=tl.int32))
    idx, inside, valid, forced, _ = _masks(num_groups_ptr, b, c, N, P, budget_groups, n_sink, n_window, floor, CHUNK)
    for h in tl.static_range(H):
        raw = tl.load(scores_ptr + b * s_stride_b + h * s_stride_h + idx, mask=inside, other=float("-inf"))
        raw = raw.to(tl.float32)
        s = _candidates(raw, forced, valid)
        m_raw, m_s = tl.reduce((raw, s), 0, _max2)
        z_raw, z_s = tl.reduce((tl.exp(raw - _finite(m_raw)), tl.exp(s - _finite(m_s))), 0, _add2)
        out = stats_ptr + ((b * n_chunks + c) * H + h) * 4
        tl.store(out, m_raw)
        tl.store(out + 1, z_raw)
        tl.store(out + 2, m_s)
        tl.store(out + 3, z_s)


@triton.jit
def _combined(stats_ptr, b, h, n_chunks, which: tl.constexpr, H: tl.constexpr, C_BLOCK: tl.constexpr):
    """A head's softmax (max, sum of exp) over the whole row from its chunks' (0: raw, 2: candidates)."""
    cs = tl.arange(0, C_BLOCK)
    at = stats_ptr + ((b * n_chunks + cs) * H + h) * 4 + which
    m = tl.load(at, mask=cs < n_chunks, other=float("-inf"))
    z = tl.load(at + 1, mask=cs < n_chunks, other=0.0)
    top = _finite(tl.max(m, 0))
    return top, tl.sum(z * tl.exp(m - top), 0)


@triton.jit
def split_mass_kernel(
    scores_ptr,
    s_stride_b,
    s_stride_h,
    num_groups_ptr,
    stats_ptr,
    key_ptr,
    ordered_ptr,
    hist_ptr,
    N,
    P,
    budget_groups,
    n_sink,
    n_window,
    floor,
    H: tl.constexpr,
    CHUNK: tl.constexpr,
    C_BLOCK: tl.constexpr,
):
    b, c = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    n_chunks = tl.num_programs(1)
    idx, inside, valid, forced, _ = _masks(num_groups_ptr, b, c, N, P, budget_groups, n_sink, n_window, floor, CHUNK)
    mass = tl.zeros([CHUNK], dtype=tl.float32)
    key = tl.zeros([CHUNK], dtype=tl.float32)
    for h in tl.static_range(H):
        m_raw, z_raw = _combined(stats_ptr, b, h, n_chunks, 0, H, C_BLOCK)
        m_s, z_s = _combined(stats_ptr, b, h, n_chunks, 2, H, C_BLOCK)
        raw = tl.load(scores_ptr + b * s_stride_b + h * s_stride_h + idx, mask=inside, other=float("-inf"))
        raw = raw.to(tl.float32)
        key += tl.exp(raw - m_raw) / tl.where(z_raw > 0, z_raw, 1.0)
        mass += tl.exp(_candidates(raw, forced, valid) - m_s) / tl.where(z_s > 0, z_s, 1.0)
    tl.store(key_ptr + b * N + idx, key, mask=inside)
    ordered = _ordered(mass, forced, valid, inside)
    tl.store(ordered_ptr + b * N + idx, ordered, mask=inside)
    top = ((ordered >> 24) & (BINS - 1)).to(tl.int32)
    tl.atomic_add(hist_ptr + b * 4 * BINS + tl.arange(0, BINS), tl.histogram(top, BINS, mask=inside))


@triton.jit
def _threshold(hist_ptr, b, count, PASSES: tl.constexpr):
    """The order key's top ``PASSES`` bytes of the count-th largest, and how many of the groups
    that share them are still to take, from the histograms of passes 0 .. PASSES-1."""
    bins = tl.arange(0, BINS)
    thr = (count * 0).to(tl.int64)
    need = count
    for p in tl.static_range(PASSES):
        hist = tl.load(hist_ptr + (b * 4 + p) * BINS + bins)
        at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # groups of this bucket with byte >= d
        digit = tl.sum((at_or_above >= need).to(tl.int32), 0) - 1  # falls with d: the largest that keeps enough
        need = need - tl.sum(tl.where(bins > digit, hist, 0), 0)
        thr = thr | (digit.to(tl.int64) << (24 - 8 * p))
    return thr, need


@triton.jit
def _chunk(
    num_groups_ptr, ordered_ptr, hist_ptr, N, P, budget_groups, floor, PASSES: tl.constexpr, CHUNK: tl.constexpr
):
    """This program's chunk: (sequence, group indices, their order keys, -1 beyond the row), and
    the threshold's top ``PASSES`` bytes with the groups still to take at it (``_threshold``)."""
    b, c = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    idx = c * CHUNK + tl.arange(0, CHUNK)
    _, count = _budget(num_groups_ptr, b, P, budget_groups, floor)
    thr, need = _threshold(hist_ptr, b, count, PASSES)
    ordered = tl.load(ordered_ptr + b * N + idx, mask=idx < N, other=-1)
    return b, c, idx, ordered, count, thr, need


@triton.jit
def split_hist_kernel(
    num_groups_ptr, ordered_ptr, hist_ptr, N, P, budget_groups, floor, PASS: tl.constexpr, CHUNK: tl.constexpr
):
    b, _, idx, ordered, _, thr, _ = _chunk(
        num_groups_ptr, ordered_ptr, hist_ptr, N, P, budget_groups, floor, PASS, CHUNK
    )
    high = 32 - 8 * PASS  # the bytes decided so far are the bits above ``high``
    same = (idx < N) & ((ordered >> high) == (thr >> high))
    digit = ((ordered >> (high - 8)) & (BINS - 1)).to(tl.int32)
    tl.atomic_add(hist_ptr + (b * 4 + PASS) * BINS + tl.arange(0, BINS), tl.histogram(digit, BINS, mask=same))


@triton.jit
def split_count_kernel(
    num_groups_ptr, ordered_ptr, hist_ptr, counts_ptr, N, P, budget_groups, floor, CHUNK: tl.constexpr
):
    b, c, _, ordered, _, thr, _ = _chunk(num_groups_ptr, ordered_ptr, hist_ptr, N, P, budget_groups, floor, 4, CHUNK)
    out = counts_ptr + (b * tl.num_programs(1) + c) * 2
    tl.store(out, tl.sum((ordered > thr).to(tl.int32), 0))
    tl.store(out + 1, tl.sum((ordered == thr).to(tl.int32), 0))


@triton.jit
def split_write_kernel(
    num_groups_ptr,
    ordered_ptr,
    hist_ptr,
    counts_ptr,
    groups_ptr,
    count_ptr,
    N,
    P,
    budget_groups,
    floor,
    CHUNK: tl.constexpr,
    C_BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b, c, idx, ordered, count, thr, need = _chunk(
        num_groups_ptr, ordered_ptr, hist_ptr, N, P, budget_groups, floor, 4, CHUNK
    )  # need: the groups at the threshold to take
    cs = tl.arange(0, C_BLOCK)
    before = cs < c
    at = counts_ptr + (b * tl.num_programs(1) + cs) * 2
    above_before = tl.sum(tl.load(at, mask=before, other=0), 0)
    ties_before = tl.sum(tl.load(at + 1, mask=before, other=0), 0)
    tie = ordered == thr
    take = ((ordered > thr) | (tie & (ties_before + tl.cumsum(tie.to(tl.int32), 0) <= need))) & (count > 0)
    pos = above_before + tl.minimum(ties_before, need) + tl.cumsum(take.to(tl.int32), 0) - 1
    tl.store(groups_ptr + b * P + pos, idx.to(tl.int32), mask=take)
    if c == 0:
        j = tl.arange(0, BLOCK_P)
        tl.store(groups_ptr + b * P + j, tl.zeros([BLOCK_P], dtype=tl.int32), mask=(j >= count) & (j < P))
        tl.store(count_ptr + b, count)
