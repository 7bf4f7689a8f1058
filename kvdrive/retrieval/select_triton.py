"""Triton body of shared-mode ``select_groups`` (launcher and torch twin: ``kvdrive.retrieval.select``).

In torch, a shared selection is ~40 kernels per layer and step (masks, two softmaxes over the
KV heads, the packed top-k key, top-k, two sorts), on every layer's serial chain. Here one
program per sequence does it in registers:
each KV head's softmax over the candidate groups, summed over heads (the estimated attention
mass, ``softmax_sum``), sinks and window forced in; a radix select finds the threshold of
the ``count`` best, and a scan writes those groups out in ascending order. The same pass sums
the softmax of the unmasked scores: the eviction key of the lookahead cache.

NOTE: the threshold is a radix select, not a sort of the packed (score, index) keys of the row
(``tl.sort`` is a bitonic sort, O(N log^2 N) in one program, and a small batch at a long
context gives few programs): it decides the threshold's 32 bits one at a time, each by one
count over the row, O(32 N). Ties go to the lower index. Rows above ``SPLIT_MIN_GROUPS``
groups take ``select_split_triton`` (many programs per sequence).
"""

import triton
import triton.language as tl


@triton.jit
def _finite(m):
    """A row's max as the exp's offset: 0 for an all -inf row (exp(-inf) = 0: masked groups weigh nothing)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _softmax(x):
    """Softmax of a row that may be all -inf (then zeros, as torch's softmax + nan_to_num)."""
    e = tl.exp(x - _finite(tl.max(x, 0)))
    z = tl.sum(e, 0)
    return e / tl.where(z > 0, z, 1.0)


@triton.jit
def _candidates(raw, forced, valid):
    """A head's float32 scores as the mass's softmax sees them: nan -> -inf, inf -> the largest
    float, sinks, window and padding -> -inf."""
    s = tl.where(raw != raw, float("-inf"), raw)  # noqa: PLR0124 (nan -> -inf)
    s = tl.where(s == float("inf"), 3.4028234663852886e38, s)
    return tl.where(forced | ~valid, float("-inf"), s)


@triton.jit
def _ordered(mass, forced, valid, inside):
    """int64 keys in 0 .. 2^32-1, monotone in the selection order (forced first, invalid last);
    -1 at padding, below everything."""
    best = tl.where(forced, float("inf"), mass)
    best = tl.where(valid, best, float("-inf")) + 0.0  # + 0.0 turns -0.0 into +0.0
    bits = best.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)  # monotone in the float
    return tl.where(inside, ordered + 0x80000000, -1)


@triton.jit
def _budget(num_groups_ptr, b, P, budget_groups, floor):
    """(the sequence's group count, the groups it takes)."""
    ng = tl.load(num_groups_ptr + b).to(tl.int32)
    return ng, tl.minimum(tl.minimum(tl.maximum(budget_groups, floor), ng), P)


@triton.jit
def _masks(num_groups_ptr, b, c, N, P, budget_groups, n_sink, n_window, floor, BLOCK: tl.constexpr):
    """Groups c*BLOCK .. c*BLOCK+BLOCK-1 of sequence b: their indices, inside the row, valid (below
    the sequence's count), forced (sink or window); and the groups the sequence takes."""
    idx = c * BLOCK + tl.arange(0, BLOCK)
    ng, count = _budget(num_groups_ptr, b, P, budget_groups, floor)
    valid = idx < ng
    forced = valid & ((idx < n_sink) | (idx >= ng - n_window))
    return idx, idx < N, valid, forced, count


@triton.jit
def select_shared_kernel(
    scores_ptr,
    s_stride_b,
    s_stride_h,
    num_groups_ptr,
    groups_ptr,
    count_ptr,
    key_ptr,
    N,
    P,
    budget_groups,
    n_sink,
    n_window,
    floor,
    H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    idx, inside, valid, forced, count = _masks(
        num_groups_ptr, b, 0, N, P, budget_groups, n_sink, n_window, floor, BLOCK_N
    )
    mass = tl.zeros([BLOCK_N], dtype=tl.float32)
    key = tl.zeros([BLOCK_N], dtype=tl.float32)
    for h in tl.static_range(H):
        raw = tl.load(scores_ptr + b * s_stride_b + h * s_stride_h + idx, mask=inside, other=float("-inf"))
        raw = raw.to(tl.float32)
        key += _softmax(raw)
        mass += _softmax(_candidates(raw, forced, valid))
    tl.store(key_ptr + b * N + idx, key, mask=inside)
    ordered = _ordered(mass, forced, valid, inside)
    # The count-th largest value: the largest t with at least ``count`` values >= t, bit by bit.
    thr = (count * 0).to(tl.int64)
    for i in tl.static_range(32):
        cand = thr | (1 << (31 - i))
        ge = tl.sum((ordered >= cand).to(tl.int32), 0)
        thr = tl.where(ge >= count, cand, thr)
    above = ordered > thr
    tie = ordered == thr
    need = count - tl.sum(above.to(tl.int32), 0)  # of the groups at the threshold, the lowest indices
    take = (above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= need))) & (count > 0)
    pos = tl.cumsum(take.to(tl.int32), 0) - 1
    tl.store(groups_ptr + b * P + pos, idx.to(tl.int32), mask=take)
    j = tl.arange(0, BLOCK_P)
    tl.store(groups_ptr + b * P + j, tl.zeros([BLOCK_P], dtype=tl.int32), mask=(j >= count) & (j < P))
    tl.store(count_ptr + b, count)
