"""Sparse paged decode attention: the dispatch and the Triton launcher.

``sparse_attention`` follows the contract in ``sparse_attention_ref`` (shapes, page order, LSE).
Implementations by name: ``torch`` (the reference; CPU and GPU), ``triton`` (GPU, or
CPU under ``TRITON_INTERPRET=1``), ``auto`` (triton on CUDA when importable, else torch).
"""

from __future__ import annotations

import functools

import torch

from kvdrive.device import triton_available
from kvdrive.errors import KvdriveError
from kvdrive.retrieval.sparse_attention_ref import check_inputs, sparse_attention_ref

IMPLS = ("auto", "torch", "triton")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_BLOCK_TOKENS = 64  # tokens per inner iteration (PAGES * G)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def plan_splits(batch: int, kv_heads: int, max_pages: int, pages_per_iter: int, sms: int) -> tuple[int, int]:
    """(num_splits, pages_per_split): enough programs to fill ~2 waves of the SMs, each
    split a whole number of inner iterations of a sequence as wide as the table (the kernel
    gives each sequence's splits equal shares of its own pages). Depends only on shapes
    (graph-capturable)."""
    iters = max(1, -(-max_pages // pages_per_iter))
    want = max(1, -(-2 * sms // max(1, batch * kv_heads)))
    splits = min(want, iters)
    per_split = -(-iters // splits) * pages_per_iter
    return -(-max(max_pages, 1) // per_split), per_split


def sparse_attention_triton(
    q,
    kv_pool,
    page_table,
    num_pages,
    last_page_len,
    scale: float,
    softcap: float | None = None,
    first_token: torch.Tensor | None = None,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    num_splits: int | None = None,
    num_warps: int = 4,
):
    """Launch the split and merge kernels. Same contract as ``sparse_attention_ref``."""

    from kvdrive.retrieval.sparse_attention_triton import sparse_decode_merge_kernel, sparse_decode_split_kernel

    num_pages = check_inputs(q, kv_pool, page_table, num_pages, last_page_len, first_token)
    if q.dtype not in DTYPES:
        raise ValueError(f"dtype {q.dtype} not supported; use one of {DTYPES}")
    b, h_q, d = q.shape
    _, _, h_kv, g, _ = kv_pool.shape
    if g & (g - 1) or block_tokens % g:
        raise ValueError(f"group size {g} must be a power of two dividing block_tokens={block_tokens}")
    if q.stride(2) != 1 or kv_pool.stride(4) != 1 or page_table.stride(2) != 1:
        raise ValueError("q, kv_pool and page_table need a unit stride in their last dimension")
    rep, p_max = h_q // h_kv, page_table.shape[2]
    pages = block_tokens // g
    sms = _sm_count(q.device.index or 0) if q.device.type == "cuda" else 4
    if num_splits is None:
        num_splits, _ = plan_splits(b, h_kv, p_max, pages, sms)
    part_o = torch.empty(b, h_q, num_splits, d, dtype=torch.float32, device=q.device)  # (B, H_q, S, D)
    part_lse = torch.empty(b, h_q, num_splits, dtype=torch.float32, device=q.device)  # (B, H_q, S)
    out = torch.empty_like(q)
    lse = torch.empty(b, h_q, dtype=torch.float32, device=q.device)
    block_d = _next_pow2(d)
    sparse_decode_split_kernel[(b, h_kv, num_splits)](
        q,
        kv_pool,
        page_table,
        num_pages,
        last_page_len,
        last_page_len if first_token is None else first_token,  # not read without HAS_FIRST
        part_o,
        part_lse,
        q.stride(0),
        q.stride(1),
        kv_pool.stride(0),
        kv_pool.stride(1),
        kv_pool.stride(2),
        kv_pool.stride(3),
        page_table.stride(0),
        page_table.stride(1),
        num_pages.stride(0),
        num_pages.stride(1),
        part_o.stride(0),
        part_o.stride(1),
        part_o.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        float(scale),
        float(softcap or 1.0),
        num_splits,
        REP=rep,
        G=g,
        D=d,
        BLOCK_H=max(16, _next_pow2(rep)),
        BLOCK_D=block_d,
        PAGES=pages,
        HAS_SOFTCAP=softcap is not None,
        HAS_FIRST=first_token is not None,
        IEEE=q.dtype == torch.float32,
        INTERPRET=q.device.type == "cpu",
        num_warps=num_warps,
    )
    sparse_decode_merge_kernel[(b, h_q)](
        part_o,
        part_lse,
        out,
        lse,
        num_splits,
        part_o.stride(0),
        part_o.stride(1),
        part_o.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        D=d,
        BLOCK_D=block_d,
        BLOCK_S=max(2, _next_pow2(num_splits)),
    )
    return out, lse


def resolve_impl(name: str, device: torch.device) -> str:
    if name not in IMPLS:
        raise KvdriveError(f"attention implementation must be one of {IMPLS}, got {name!r}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return name


def sparse_attention(
    q,
    kv_pool,
    page_table,
    num_pages,
    last_page_len,
    scale: float,
    softcap: float | None = None,
    impl: str = "auto",
    first_token: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over the listed pages -> (out (B, H_q, D) q.dtype, lse (B, H_q) float32)."""
    args = (q, kv_pool, page_table, num_pages, last_page_len, scale, softcap, first_token)
    if resolve_impl(impl, q.device) == "triton":
        return sparse_attention_triton(*args)
    return sparse_attention_ref(*args)
