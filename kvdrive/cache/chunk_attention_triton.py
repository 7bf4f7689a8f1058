"""Triton body of ``flash_prefill.chunk_attention_triton``: a prefill chunk's causal attention,
aligned to the lower right, over its prefix and itself (torch twin: SDPA with
``causal_lower_right``, in ``flash_prefill.chunk_attention_reference``).

One program per (block of BLOCK_M queries, sequence x query head). It walks the key blocks
every row of its block sees without a mask, then the blocks across the diagonal with one, in
the online-softmax form of FlashAttention-2 (base-2 exponentials, the scale folded into
``scale_log2``). A query head reads its KV head's keys in place (GQA without a copy). Every
shape compiles once per (D, block sizes): a new prefix length is a new argument, not a new
kernel or plan. D must be a power of two of at least 16 (BLOCK_D = D; the launcher checks).
``PAGED``: the keys are read where a page pool holds them, key n at token n % G of the page
the row's page table lists at n // G (no gather into a contiguous copy first).
``TMA`` (Hopper and later): K and V blocks arrive by bulk tensor copies through tensor
descriptors instead of per-thread loads; paged, a key block must lie inside one page.
"""

import triton
import triton.language as tl


@triton.jit
def _kv_block(
    n0,
    S,
    k_ptr,
    v_ptr,
    k_base,
    v_base,
    row_ptr,
    b,
    hk,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    G: tl.constexpr,
    HKV: tl.constexpr,
    PAGED: tl.constexpr,
    TMA: tl.constexpr,
):
    """Keys and values [n0, n0 + BLOCK_N), (BLOCK_N, BLOCK_D) each; rows past S are zero
    (pointers: masked; contiguous TMA: the descriptor's bounds) or, for paged TMA, whatever
    the last page holds there (the caller masks their scores and zeroes their values)."""
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < S
    if TMA:  # bulk tensor copies; paged: the block lies inside one page (G % BLOCK_N == 0)
        if PAGED:  # one descriptor over the pool as (pages * 2 * H_kv, G, D): K then V heads
            r = tl.load(row_ptr + n0 // G) * (2 * HKV) + hk
            k = k_ptr.load([r, n0 % G, 0]).reshape(BLOCK_N, BLOCK_D)
            v = v_ptr.load([r + HKV, n0 % G, 0]).reshape(BLOCK_N, BLOCK_D)
        else:  # (B, H_kv, S, D) descriptors
            k = k_ptr.load([b, hk, n0, 0]).reshape(BLOCK_N, BLOCK_D)
            v = v_ptr.load([b, hk, n0, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        if PAGED:  # key n is token n % G of the row's page n // G
            page = tl.load(row_ptr + n // G, mask=n_ok, other=0).to(tl.int64)
            k_ptrs = k_base + page[:, None] * stride_kb + (n % G)[:, None] * stride_ks
            v_ptrs = v_base + page[:, None] * stride_vb + (n % G)[:, None] * stride_vs
        else:
            k_ptrs = k_base + n[:, None] * stride_ks
            v_ptrs = v_base + n[:, None] * stride_vs
        k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
    return k, v


@triton.jit
def _tile(
    q,
    k,
    v,
    n0,
    S,
    prefix,
    offs_m,
    m_i,
    l_i,
    acc,
    scale_log2,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Key block [n0, n0 + BLOCK_N): scores, the running max and sum, the weighted values."""
    if IEEE:  # fp32 inputs (and every input under the interpreter, which has no bf16 dot)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale_log2  # (BLOCK_M, BLOCK_N), log2 units
    if MASKED:  # query i sees keys up to prefix + i; keys past S are nothing (zeroed: 0 * NaN is NaN)
        n = n0 + tl.arange(0, BLOCK_N)
        s = tl.where((n[None, :] <= prefix + offs_m[:, None]) & (n[None, :] < S), s, float("-inf"))
        v = tl.where((n < S)[:, None], v, 0.0)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit(do_not_specialize=["T", "S"])  # chunks and prefixes of any length: one kernel
def chunk_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    stride_qb,
    stride_qh,
    stride_qt,  # q (B, H_q, T, D), head_dim stride 1
    stride_kb,
    stride_kh,
    stride_ks,  # k (B, H_kv, S, D); PAGED: a page pool's K (pages, H_kv, G, D), stride_kb per page
    stride_vb,
    stride_vh,
    stride_vs,  # v as k
    stride_ob,
    stride_oh,
    stride_ot,  # out (B, H_q, T, D)
    rows_ptr,
    stride_rb,  # page table (B, pages) int32, page stride 1 (PAGED)
    T,
    S,
    scale_log2,
    HQ: tl.constexpr,
    REP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    G: tl.constexpr,
    PAGED: tl.constexpr,
    HAS_LSE: tl.constexpr,
    IEEE: tl.constexpr,
    INTERPRET: tl.constexpr,
    TMA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = bh % HQ
    hk = (h // REP).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=m_ok[:, None]
    )
    if IEEE:
        q = q.to(tl.float32)
    if TMA:  # k_ptr and v_ptr are tensor descriptors
        k_base, v_base = k_ptr, v_ptr
    else:
        k_base = k_ptr + hk * stride_kh + offs_d[None, :]
        v_base = v_ptr + hk * stride_vh + offs_d[None, :]
        if not PAGED:  # b's rows; paged, the page table says where each key is
            k_base += b * stride_kb
            v_base += b * stride_vb
    kv = (k_ptr, v_ptr, k_base, v_base, rows_ptr + b * stride_rb, b.to(tl.int32), hk.to(tl.int32))
    kv += (stride_kb, stride_ks, stride_vb, stride_vs)
    prefix = S - T  # query i sees keys 0 .. prefix + i
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full = (prefix + pid_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N  # keys below: seen by every row
    last = tl.minimum(prefix + (pid_m + 1) * BLOCK_M, S)  # one past the last key any row sees
    args = (S, prefix, offs_m)
    if INTERPRET:  # the interpreter cannot range() over bounds computed from program ids
        n0 = 0
        while n0 < full:
            k, v = _kv_block(n0, S, *kv, BLOCK_N, BLOCK_D, G, HQ // REP, PAGED, TMA)
            m_i, l_i, acc = _tile(q, k, v, n0, *args, m_i, l_i, acc, scale_log2, BLOCK_N, False, IEEE)
            n0 += BLOCK_N
        while n0 < last:
            k, v = _kv_block(n0, S, *kv, BLOCK_N, BLOCK_D, G, HQ // REP, PAGED, TMA)
            m_i, l_i, acc = _tile(q, k, v, n0, *args, m_i, l_i, acc, scale_log2, BLOCK_N, True, IEEE)
            n0 += BLOCK_N
    else:
        for n0 in range(0, full, BLOCK_N):  # every row sees these keys: no mask
            k, v = _kv_block(n0, S, *kv, BLOCK_N, BLOCK_D, G, HQ // REP, PAGED, TMA)
            m_i, l_i, acc = _tile(q, k, v, n0, *args, m_i, l_i, acc, scale_log2, BLOCK_N, False, IEEE)
        for n0 in range(full, last, BLOCK_N):  # across the diagonal
            k, v = _kv_block(n0, S, *kv, BLOCK_N, BLOCK_D, G, HQ // REP, PAGED, TMA)
            m_i, l_i, acc = _tile(q, k, v, n0, *args, m_i, l_i, acc, scale_log2, BLOCK_N, True, IEEE)
    out = acc / l_i[:, None]
    tl.store(
        o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=m_ok[:, None],
    )
    if HAS_LSE:  # natural-log LSE of the scaled scores, (B, H_q, T) contiguous
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
        tl.store(lse_ptr + (b * HQ + h) * T + offs_m, lse, mask=m_ok)
