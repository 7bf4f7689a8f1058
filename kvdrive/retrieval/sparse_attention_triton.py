"""Triton bodies of sparse paged decode attention (split-K, GQA-packed).

Phase 1, grid (B, H_kv, splits): one program takes all R = H_q / H_kv query heads of a KV
head (padded to BLOCK_H rows so ``tl.dot`` runs on the tensor cores) and a contiguous
range of the listed pages, PAGES pages (PAGES * G tokens) per iteration, gathered
through the page table; online softmax in float32, base-2 exponent. It writes a
normalized partial output and its log2-sum-exp per split; a split past a sequence's pages
runs no iteration and writes an empty part. With HAS_FIRST (pages listed in position
order, page i holding tokens i*G ..: the plain paged cache), tokens before ``first[b]`` are
masked and the pages wholly before it skipped: a sliding window.
Phase 2, grid (B, H_q): merges the splits exactly by their LSE (``merge.py``'s formula).
INTERPRET (set by the launcher for CPU tensors, i.e. under TRITON_INTERPRET=1) swaps in
what the CPU interpreter can run: a while loop and float32 dot operands.
The launcher (checks, split count, grid) is ``kvdrive.retrieval.sparse_attention``; this module is
imported only when the Triton path runs.
"""

import triton
import triton.language as tl


@triton.jit
def _attend_pages(
    q,
    m_i,
    l_i,
    acc,
    p0,
    end,
    n_pages,
    last_len,
    first,
    row,
    head_pool,
    stride_ps,
    stride_pkv,
    stride_pg,
    scale,
    softcap,
    G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D: tl.constexpr,
    PAGES: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_FIRST: tl.constexpr,
    IEEE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One online-softmax step over pages [p0, p0 + PAGES) of the listed range (< end)."""
    offs_n = tl.arange(0, PAGES * G)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    page = p0 + offs_n // G
    tok = offs_n % G
    p_ok = page < end
    slot = tl.load(row + page, mask=p_ok, other=0).to(tl.int64)  # int64: pools exceed 2**31 elements
    ok = p_ok & ((page < n_pages - 1) | (tok < last_len))  # (PAGES*G,)
    if HAS_FIRST:
        ok = ok & (page * G + tok >= first)
    kv = head_pool + slot * stride_ps + tok * stride_pg  # (PAGES*G,) row starts
    k = tl.load(kv[:, None] + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(kv[:, None] + stride_pkv + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
    if INTERPRET:
        # NOTE: the CPU interpreter (triton 3.6) returns garbage for bf16 tl.dot; it checks
        # indexing and the online softmax, in float32. The GPU path keeps bf16 operands.
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BLOCK_H, PAGES*G) float32
    else:
        qk = tl.dot(q, tl.trans(k))
    qk = qk * scale
    if HAS_SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates correctly at both ends
        qk = softcap * (1.0 - 2.0 / (tl.exp(2.0 * qk / softcap) + 1.0))
    qk = tl.where(ok[None, :], qk * 1.4426950408889634, float("-inf"))  # log2 units
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


# The split count and the partial strides are not specialized: a new shape must not compile a
# new kernel while the engine waits (Triton keys on ints == 1 and % 16).
@triton.jit(do_not_specialize=["num_splits", "stride_lb", "stride_lh"])
def sparse_decode_split_kernel(
    q_ptr,
    pool_ptr,
    pt_ptr,
    np_ptr,
    last_ptr,
    first_ptr,
    po_ptr,
    plse_ptr,
    stride_qb,
    stride_qh,
    stride_ps,
    stride_pkv,
    stride_ph,
    stride_pg,  # pool (slot, K|V, head, token); head_dim stride 1
    stride_tb,
    stride_th,  # page table (b, head); page stride 1
    stride_nb,
    stride_nh,  # num_pages (b, head); head stride 0 for a (B,) count
    stride_ob,
    stride_oh,
    stride_os,  # partial out (B, H_q, S, D) float32
    stride_lb,
    stride_lh,  # partial lse (B, H_q, S) float32, split stride 1
    scale,
    softcap,
    num_splits,
    REP: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGES: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_FIRST: tl.constexpr,
    IEEE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.program_id(1)
    s = tl.program_id(2)
    n_pages = tl.load(np_ptr + b * stride_nb + j * stride_nh)
    last_len = tl.load(last_ptr + b)
    first = 0
    lo = 0
    if HAS_FIRST:
        first = tl.load(first_ptr + b)
        lo = first // G  # pages wholly before the window: not read
    # Split s takes its share of this sequence's own pages [lo, n_pages), in whole iterations: the
    # shares follow the sequence's length, not the table's width, so a table of any width (a
    # captured graph's whole allocation) keeps every split busy on the keys that exist.
    per = tl.cdiv(tl.cdiv(n_pages - lo, PAGES), num_splits) * PAGES
    start = lo + s * per
    end = tl.minimum(start + per, n_pages)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < REP
    d_ok = offs_d < D
    heads = j * REP + offs_h  # query heads of KV head j
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # (BLOCK_H, BLOCK_D)
    if INTERPRET:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    row = pt_ptr + b * stride_tb + j * stride_th
    head_pool = pool_ptr + j * stride_ph
    if INTERPRET:
        # NOTE: the CPU interpreter cannot run range() over loaded bounds; the GPU path keeps
        # the for loop, which the compiler can software-pipeline.
        p0 = start
        while p0 < end:
            m_i, l_i, acc = _attend_pages(
                q,
                m_i,
                l_i,
                acc,
                p0,
                end,
                n_pages,
                last_len,
                first,
                row,
                head_pool,
                stride_ps,
                stride_pkv,
                stride_pg,
                scale,
                softcap,
                G,
                BLOCK_D,
                D,
                PAGES,
                HAS_SOFTCAP,
                HAS_FIRST,
                IEEE,
                INTERPRET,
            )
            p0 += PAGES
    else:
        for p0 in range(start, end, PAGES):
            m_i, l_i, acc = _attend_pages(
                q,
                m_i,
                l_i,
                acc,
                p0,
                end,
                n_pages,
                last_len,
                first,
                row,
                head_pool,
                stride_ps,
                stride_pkv,
                stride_pg,
                scale,
                softcap,
                G,
                BLOCK_D,
                D,
                PAGES,
                HAS_SOFTCAP,
                HAS_FIRST,
                IEEE,
                INTERPRET,
            )

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse2 = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(
        po_ptr + b * stride_ob + heads[:, None] * stride_oh + s * stride_os + offs_d[None, :],
        out,
        mask=h_ok[:, None] & d_ok[None, :],
    )
    tl.store(plse_ptr + b * stride_lb + heads * stride_lh + s, lse2, mask=h_ok)


@triton.jit(do_not_specialize=["num_splits", "stride_lb", "stride_lh"])
def sparse_decode_merge_kernel(
    po_ptr,
    plse_ptr,
    o_ptr,
    lse_ptr,
    num_splits,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_fb,
    stride_fh,
    stride_gb,  # final out (B, H_q, D), final lse (B, H_q)
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    lse2 = tl.load(plse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse2, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse2 - m_safe)  # (BLOCK_S,)
    total = tl.sum(w, 0)
    parts = tl.load(
        po_ptr + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
        mask=s_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )  # (BLOCK_S, BLOCK_D)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    lse = tl.where(total > 0, (m_safe + tl.log2(tl.where(total > 0, total, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(o_ptr + b * stride_fb + h * stride_fh + offs_d, out.to(o_ptr.dtype.element_ty), mask=offs_d < D)
    tl.store(lse_ptr + b * stride_gb + h, lse)
