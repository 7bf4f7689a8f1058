"""kvdrive's own flash-attention kernel for a prefill chunk (``KVDRIVE_PREFILL_KERNEL=triton``).

A chunk of T queries over S keys (its prefix, then itself), causal aligned to the lower right:
query i sees keys 0 .. S - T + i. torch's flash op takes that mask in one call but runs at
FlashAttention-2's speed; cuDNN's faster kernel takes only square or no masks and builds a plan
for every new shape (``split_prefill``). This Triton kernel (``chunk_attention_triton``) takes
any prefix length without a plan, GQA without a K/V copy, and returns the LSE where asked.
``paged_chunk_attention_triton`` reads the keys where the paged cache's pool holds them.
``chunk_attention_reference`` is the twin of both (fp32, the mask materialised).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kvdrive import env
from kvdrive.errors import KvdriveError

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


def supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the kernel takes q (B, H_q, T, D) over k (B, H_kv, S, D): D a power of two in
    16..256, a dtype it runs, H_q a multiple of H_kv, at least as many keys as queries."""
    return _takes(q, k.shape[1], k.shape[2])


def runs(q: torch.Tensor, kv_heads: int, keys: int) -> bool:
    """Whether a chunk q over ``keys`` keys of ``kv_heads`` heads goes to this kernel (contiguous or
    paged): CUDA, more than one query, ``KVDRIVE_PREFILL_KERNEL=triton``, a shape and dtype it takes."""
    return q.is_cuda and q.shape[2] > 1 and env.prefill_kernel() == "triton" and _takes(q, kv_heads, keys)


def _takes(q: torch.Tensor, kv_heads: int, keys: int) -> bool:
    d = q.shape[-1]
    return (
        q.dtype in DTYPES and 16 <= d <= 256 and d & (d - 1) == 0 and q.shape[1] % kv_heads == 0 and keys >= q.shape[2]
    )


def _blocks(q: torch.Tensor) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the GPU; small tiles under the interpreter."""
    if q.device.type == "cpu":
        return 16, 16, 4, 1
    d = q.shape[-1]
    if d <= 64:
        return 128, 64, 4, 3
    if d <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2


def chunk_attention_triton(q, k, v, scale: float, with_lse: bool = False, tma: bool | None = None):
    """Causal attention of q (B, H_q, T, D) over k/v (B, H_kv, S, D), aligned to the lower
    right. Returns out (B, H_q, T, D) in q's dtype, and with ``with_lse`` its natural-log LSE
    (B, H_q, T) fp32 as well. On CUDA compiled; on CPU under Triton's interpreter. ``tma``:
    K and V through tensor descriptors (default: on Hopper and later, where the layout allows)."""
    if not supported(q, k):
        raise KvdriveError(f"chunk_attention_triton does not take q {tuple(q.shape)} {q.dtype} over k {tuple(k.shape)}")
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    b, hkv, s, d = k.shape
    if _tma(q, tma, k, v):
        from triton.tools.tensor_descriptor import TensorDescriptor

        block = [1, 1, _blocks(q)[1], d]
        k, v = (TensorDescriptor(x, list(x.shape), list(x.stride()), block) for x in (k, v))
    return _launch(q, k, v, None, s, 1, hkv, scale, with_lse)


def paged_chunk_attention_triton(q, pool, rows, length: int, scale: float, with_lse: bool = False, tma=None):
    """The same over keys a page pool holds: pool (pages, 2, H_kv, G, D) (K then V of G tokens
    a page), rows (B, P) int32 the pages of each sequence in position order from position 0,
    ``length`` the keys the chunk sees (its own last). Reads the pages in place: no gather."""
    n, _, hkv, g, d = pool.shape
    if not _takes(q, hkv, length) or rows.shape[1] * g < length:
        raise KvdriveError(
            f"paged_chunk_attention_triton does not take q {tuple(q.shape)} over {length} keys of pages {tuple(pool.shape)}"
        )
    block_n = _blocks(q)[1]
    if g % block_n == 0 and pool.is_contiguous() and _tma(q, tma, pool):  # a key block inside one page
        from triton.tools.tensor_descriptor import TensorDescriptor

        k = v = TensorDescriptor(pool, [n * 2 * hkv, g, d], [g * d, d, 1], [1, block_n, d])
    else:
        k, v = pool[:, 0], pool[:, 1]  # (pages, H_kv, G, D) views
    return _launch(q, k, v, rows, length, g, hkv, scale, with_lse)


def _tma(q: torch.Tensor, wanted: bool | None, *tensors: torch.Tensor) -> bool:
    """Whether K/V go through tensor descriptors: as asked, else for 16-bit KV on a GPU of compute
    capability 9 or more (fp32 tiles, multi-buffered, outgrow shared memory at D = 128); never
    where a base or a leading stride is not a multiple of 16 bytes (the bulk copy's rule)."""
    if any(x.data_ptr() % 16 or any(st * x.element_size() % 16 for st in x.stride()[:-1]) for x in tensors):
        return False
    if wanted is not None:
        return wanted
    return q.is_cuda and tensors[0].element_size() == 2 and torch.cuda.get_device_capability(q.device)[0] >= 9


def _launch(q, k, v, rows, length: int, g: int, kv_heads: int, scale: float, with_lse: bool):
    """k, v: tensors (strided loads) or tensor descriptors (``TMA``)."""
    import triton

    from kvdrive.cache.chunk_attention_triton import chunk_attention_kernel

    q = q if q.stride(-1) == 1 else q.contiguous()
    b, hq, t, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, t, device=q.device, dtype=torch.float32) if with_lse else out
    paged = rows is not None
    table = rows if paged else out  # an unused pointer when not paged
    block_m, block_n, warps, stages = _blocks(q)
    tma = not isinstance(k, torch.Tensor)
    strides = (0, 0, 0, 0, 0, 0) if tma else (*k.stride()[:3], *v.stride()[:3])
    chunk_attention_kernel[(triton.cdiv(t, block_m), b * hq)](
        q,
        k,
        v,
        out,
        lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        *strides,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        table,
        table.stride(0),
        t,
        length,
        float(scale) * LOG2E,
        HQ=hq,
        REP=hq // kv_heads,
        BLOCK_D=d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        G=g,
        PAGED=paged,
        HAS_LSE=with_lse,
        IEEE=q.dtype == torch.float32 or q.device.type == "cpu",
        INTERPRET=q.device.type == "cpu",
        TMA=tma,
        num_warps=warps,
        num_stages=stages,
    )
    return (out, lse) if with_lse else out


def chunk_attention_reference(q, k, v, scale: float, with_lse: bool = False):
    """The twin: the same attention in fp32 with the mask materialised (and its LSE)."""
    t, s = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    kf, vf = (x.float().repeat_interleave(rep, 1) for x in (k, v))
    if not with_lse:
        mask = causal_lower_right(t, s)
        return F.scaled_dot_product_attention(q.float(), kf, vf, attn_mask=mask, scale=scale).to(q.dtype)
    logits = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    visible = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    logits = logits.masked_fill(~visible, float("-inf"))
    lse = logits.logsumexp(-1)
    return torch.matmul((logits - lse[..., None]).exp(), vf).to(q.dtype), lse
