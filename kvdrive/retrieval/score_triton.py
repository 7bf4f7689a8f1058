"""Triton body of ``GroupSummarizer.score`` for the ``minmax`` and ``mean`` summaries on CUDA
(torch twin: ``GroupSummarizer.score`` with ``_per_head_dot``).

NOTE: in torch a score is about ten kernels: the split query and its block-diagonal copy,
the GEMM, a float copy of its transposed output, the max over query heads, the scale, the
mask from the group counts (arange, compare, not, fill), on the serial chain before the
fetch and several times the time to read the summaries. Here it is one
launch reading each summary once, with torch's roundings: the split query in the summaries'
dtype, each dot product rounded to it (the GEMM's output dtype), then the head reduction.
"""

import triton
import triton.language as tl


@triton.jit
def group_score_kernel(q_ptr, s_ptr, count_ptr, out_ptr, N, scale,
                       sq_b, sq_h, ss_b, ss_n, ss_h, so_b, so_h,
                       R: tl.constexpr, D: tl.constexpr, MINMAX: tl.constexpr, MEAN: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    count = tl.load(count_ptr + b)
    inside = (n < N)[:, None]
    row = s_ptr + b * ss_b + n[:, None].to(tl.int64) * ss_n + h * ss_h + d[None, :]
    upper = tl.load(row, mask=inside, other=0.0).to(tl.float32)  # (BLOCK_N, D): max, or the mean
    if MINMAX:
        lower = tl.load(row + D, mask=inside, other=0.0).to(tl.float32)
    red = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    if MEAN:
        red = tl.zeros((BLOCK_N,), tl.float32)
    for r in tl.static_range(R):
        q = tl.load(q_ptr + b * sq_b + (h * R + r) * sq_h + d).to(tl.float32)
        if MINMAX:  # q.k <= sum_d max(q_d max_d, q_d min_d)
            pos = tl.maximum(q, 0.0).to(s_ptr.dtype.element_ty).to(tl.float32)
            neg = tl.minimum(q, 0.0).to(s_ptr.dtype.element_ty).to(tl.float32)
            dot = tl.sum(upper * pos[None, :] + lower * neg[None, :], axis=1)
        else:
            q = q.to(s_ptr.dtype.element_ty).to(tl.float32)
            dot = tl.sum(upper * q[None, :], axis=1)
        dot = dot.to(s_ptr.dtype.element_ty).to(tl.float32)
        if MEAN:
            red += dot
        else:
            red = tl.maximum(red, dot)
    if MEAN:
        red = red / R
    score = tl.where(n < count, red * scale, float("-inf"))
    tl.store(out_ptr + b * so_b + h * so_h + n, score, mask=n < N)
