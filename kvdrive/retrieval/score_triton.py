"""Triton body of ``GroupSummarizer.score`` on CUDA: ``group_scores`` for the ``minmax`` and
``mean`` summaries, ``token_scores`` for ``tokenmax`` and ``tokenlse`` (torch twin:
``GroupSummarizer.score`` with ``_per_head_dot``).

NOTE: in torch a score is about ten kernels: the split query and its block-diagonal copy,
the GEMM, a float copy of its transposed output, the max over query heads, the scale, the
mask from the group counts (arange, compare, not, fill), on the serial chain before the
fetch and several times the time to read the summaries. Here it is one
launch reading each summary once, with torch's roundings: the split query in the summaries'
dtype, each dot product rounded to it (the GEMM's output dtype), then the head reduction.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def group_score_kernel(
    q_ptr,
    s_ptr,
    count_ptr,
    out_ptr,
    N,
    scale,
    sq_b,
    sq_h,
    ss_b,
    ss_n,
    ss_h,
    so_b,
    so_h,
    R: tl.constexpr,
    D: tl.constexpr,
    MINMAX: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
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


@triton.jit
def token_score_kernel(
    q_ptr,
    s_ptr,
    count_ptr,
    out_ptr,
    N,
    scale,
    sq_b,
    sq_h,
    ss_b,
    ss_n,
    ss_h,
    so_b,
    so_h,
    R: tl.constexpr,
    BLOCK_R: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    MEAN: tl.constexpr,
    LSE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``tokenmax`` scores: per group, the max over its G tokens of q . (lo + code * (hi - lo) / 3)
    (layout: ``kvdrive.retrieval.token_summary``), reduced over the R query heads of KV head h;
    ``LSE`` (``tokenlse``): logsumexp over the tokens of scale * q . k, divided by scale.
    The dequantized keys of BLOCK_N groups meet the R queries in one tensor-core dot (fp16 in,
    float32 out)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    j = tl.arange(0, G * D // 4)
    r = tl.arange(0, BLOCK_R)
    count = tl.load(count_ptr + b)
    inside = n < N
    row = s_ptr + b * ss_b + n.to(tl.int64) * ss_n + h * ss_h  # (BLOCK_N,) byte pointers
    half = row.to(tl.pointer_type(tl.float16))
    lo = tl.load(half[:, None] + d[None, :], mask=inside[:, None], other=0.0).to(tl.float32)  # (BLOCK_N, D)
    hi = tl.load(half[:, None] + D + d[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
    step = (hi - lo) / 3.0
    packed = tl.load(row[:, None] + 4 * D + j[None, :], mask=inside[:, None], other=0)  # (BLOCK_N, G*D/4) uint8
    shifts = (tl.arange(0, 4) * 2).to(tl.uint8)
    codes = (packed[:, :, None] >> shifts[None, None, :]) & 3  # (BLOCK_N, G*D/4, 4): code t*D + d in order
    codes = tl.reshape(codes, (BLOCK_N, G, D)).to(tl.float32)
    keys = lo[:, None, :] + codes * step[:, None, :]  # (BLOCK_N, G, D)
    keys = tl.reshape(keys, (BLOCK_N * G, D)).to(tl.float16)
    q = tl.load(q_ptr + b * sq_b + (h * R + r)[None, :] * sq_h + d[:, None], mask=(r < R)[None, :], other=0.0)
    logits = tl.dot(keys, q.to(tl.float16))  # (BLOCK_N * G, BLOCK_R) float32
    logits = tl.reshape(logits, (BLOCK_N, G, BLOCK_R))
    best = tl.max(logits, axis=1)  # (BLOCK_N, BLOCK_R)
    if LSE:
        best += tl.log(tl.sum(tl.exp((logits - best[:, None, :]) * scale), axis=1)) / scale
    if MEAN:
        red = tl.sum(tl.where((r < R)[None, :], best, 0.0), axis=1) / R
    else:
        red = tl.max(tl.where((r < R)[None, :], best, float("-inf")), axis=1)
    score = tl.where(n < count, red * scale, float("-inf"))
    tl.store(out_ptr + b * so_b + h * so_h + n, score, mask=inside)


SCORE_BLOCK_N, SCORE_WARPS = 64, 8  # per program: groups, warps (the fastest measured: docs/attention.md)


def group_scores(
    q, summaries, counts, scale, kv_heads, head_reduce, name, block_n: int | None = None, num_warps: int | None = None
) -> torch.Tensor:
    b, n = summaries.shape[:2]
    out = torch.empty(b, kv_heads, n, dtype=torch.float32, device=q.device)
    block_n, num_warps = block_n or SCORE_BLOCK_N, num_warps or SCORE_WARPS
    if out.numel():
        group_score_kernel[(b, kv_heads, -(-n // block_n))](
            *_score_args(q, summaries, counts, out, scale),
            R=q.shape[1] // kv_heads,
            D=q.shape[2],
            MINMAX=name == "minmax",
            MEAN=head_reduce == "mean",
            BLOCK_N=block_n,
            num_warps=num_warps,
        )
    return out


def _score_args(q, summaries, counts, out, scale) -> tuple:
    """The pointers, sizes and strides both score kernels take first (q, summaries, counts, out, N, scale, strides)."""
    return (
        q,
        summaries,
        counts.contiguous(),
        out,
        summaries.shape[1],
        float(scale),
        q.stride(0),
        q.stride(1),
        summaries.stride(0),
        summaries.stride(1),
        summaries.stride(2),
        out.stride(0),
        out.stride(1),
    )


TOKEN_SCORE_CODES = 8192  # keys dequantized per program (BLOCK_N groups x G tokens x D), one dot with the queries


def token_scores(q, summaries, counts, scale, kv_heads, head_reduce, group_tokens, name) -> torch.Tensor:
    b, n = summaries.shape[:2]
    out = torch.empty(b, kv_heads, n, dtype=torch.float32, device=q.device)
    fit = max(1, TOKEN_SCORE_CODES // (group_tokens * q.shape[2]))
    block_n = 1 << (fit.bit_length() - 1)  # a power of two (tl.arange)
    if out.numel():
        token_score_kernel[(b, kv_heads, -(-n // block_n))](
            *_score_args(q, summaries, counts, out, scale),
            R=q.shape[1] // kv_heads,
            BLOCK_R=max(16, 1 << (q.shape[1] // kv_heads - 1).bit_length()),
            D=q.shape[2],
            G=group_tokens,
            MEAN=head_reduce == "mean",
            LSE=name == "tokenlse",
            BLOCK_N=block_n,
            num_warps=4,
        )
    return out
