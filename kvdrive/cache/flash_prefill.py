"""kvdrive's own flash-attention kernel for a prefill chunk (``KVDRIVE_PREFILL_KERNEL=triton``).

A chunk of T queries over S keys (its prefix, then itself), causal aligned to the lower right:
query i sees keys 0 .. S - T + i. torch's flash op takes that mask in one call but runs at
FlashAttention-2's speed; cuDNN's faster kernel takes only square or no masks and builds a plan
for every new shape (``split_prefill``). This Triton kernel (``chunk_attention_triton``) takes
any prefix length without a plan, GQA without a K/V copy, and returns the LSE where asked.
``chunk_attention_reference`` is its torch twin (fp32, the mask materialised).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kvdrive.errors import KvdriveError

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


def supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the kernel takes q (B, H_q, T, D) over k (B, H_kv, S, D): D a power of two in
    16..256, a dtype it runs, H_q a multiple of H_kv, at least as many keys as queries."""
    d = q.shape[-1]
    return (
        q.dtype in DTYPES
        and d >= 16
        and d <= 256
        and d & (d - 1) == 0
        and q.shape[1] % k.shape[1] == 0
        and k.shape[2] >= q.shape[2]
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


def chunk_attention_triton(q, k, v, scale: float, with_lse: bool = False):
    """Causal attention of q (B, H_q, T, D) over k/v (B, H_kv, S, D), aligned to the lower
    right. Returns out (B, H_q, T, D) in q's dtype, and with ``with_lse`` its natural-log LSE
    (B, H_q, T) fp32 as well. On CUDA compiled; on CPU under Triton's interpreter."""
    from kvdrive.cache.chunk_attention_triton import chunk_attention_kernel

    if not supported(q, k):
        raise KvdriveError(f"chunk_attention_triton does not take q {tuple(q.shape)} {q.dtype} over k {tuple(k.shape)}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    b, hq, t, d = q.shape
    s = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, t, device=q.device, dtype=torch.float32) if with_lse else out
    block_m, block_n, warps, stages = _blocks(q)
    grid = (triton_cdiv(t, block_m), b * hq)
    chunk_attention_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        t,
        s,
        float(scale) * LOG2E,
        HQ=hq,
        REP=hq // k.shape[1],
        BLOCK_D=d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_LSE=with_lse,
        IEEE=q.dtype == torch.float32 or q.device.type == "cpu",
        INTERPRET=q.device.type == "cpu",
        num_warps=warps,
        num_stages=stages,
    )
    return (out, lse) if with_lse else out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
