"""Reference sparse decode attention over a paged KV pool (pure torch, CPU or GPU).

The contract every implementation (``kvdrive.retrieval.sparse_attention``) follows:

* ``q`` (B, H_q, D), post-RoPE; query head h reads KV head ``h // (H_q // H_kv)``.
* ``kv_pool`` (S, 2, H_kv, G, D): slot s holds one group; [s, 0] keys (post-RoPE), [s, 1] values.
* ``page_table`` int32 (B, H_kv, P): slots attended by (sequence, KV head); the first
  ``num_pages`` entries count, in any order except that the partly filled group is last.
* ``num_pages`` int32 (B,) or (B, H_kv); ``last_page_len`` int32 (B,) in 1..G: valid
  tokens of the last listed page; every earlier page is full.
* ``first_token`` int32 (B,) or None: pages listed in position order (page i of the table holds
  tokens i*G .. i*G + G - 1 of the sequence), tokens before ``first_token[b]`` masked: a
  sliding window over the plain paged cache. None: every listed token counts.
* logits are ``scale * q.k``, then ``softcap * tanh(logit / softcap)`` if softcap is set.
* returns ``out`` (B, H_q, D) in q's dtype and ``lse`` (B, H_q) float32, natural log of
  the softmax denominator, for ``merge.merge_attention``. No pages: out 0, lse -inf.

Softmax is exact over the listed tokens, accumulated in float32.
"""

from __future__ import annotations

import torch


def check_inputs(q, kv_pool, page_table, num_pages, last_page_len, first_token=None) -> torch.Tensor:
    """Shape/dtype checks shared by all implementations; returns num_pages as (B, H_kv)."""
    if q.dim() != 3 or kv_pool.dim() != 5 or kv_pool.shape[1] != 2:
        raise ValueError(
            f"q must be (B, H_q, D) and kv_pool (S, 2, H_kv, G, D); got {tuple(q.shape)}, {tuple(kv_pool.shape)}"
        )
    b, h_q, d = q.shape
    _, _, h_kv, _, d_pool = kv_pool.shape
    if d != d_pool or h_q % h_kv:
        raise ValueError(f"q (B, {h_q}, {d}) does not fit a pool of {h_kv} KV heads of dim {d_pool}")
    if page_table.dtype != torch.int32 or page_table.dim() != 3 or tuple(page_table.shape[:2]) != (b, h_kv):
        raise ValueError(
            f"page_table must be int32 (B={b}, H_kv={h_kv}, P), got {page_table.dtype} {tuple(page_table.shape)}"
        )
    if num_pages.dtype != torch.int32 or last_page_len.dtype != torch.int32:
        raise ValueError("num_pages and last_page_len must be int32")
    if num_pages.dim() == 1:
        num_pages = num_pages[:, None].expand(b, h_kv)
    if tuple(num_pages.shape) != (b, h_kv) or tuple(last_page_len.shape) != (b,):
        raise ValueError(
            f"num_pages must be (B,) or (B, H_kv), last_page_len (B,); got "
            f"{tuple(num_pages.shape)}, {tuple(last_page_len.shape)}"
        )
    if first_token is not None and (first_token.dtype != torch.int32 or tuple(first_token.shape) != (b,)):
        raise ValueError(f"first_token must be int32 (B={b},), got {first_token.dtype} {tuple(first_token.shape)}")
    if q.dtype != kv_pool.dtype:
        raise ValueError(f"q is {q.dtype} but the pool is {kv_pool.dtype}")
    return num_pages


def token_mask(
    num_pages: torch.Tensor, last_page_len: torch.Tensor, p: int, g: int, first_token: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, H_kv) pages, (B,) last length, (B,) first token or None -> (B, H_kv, P*G) bool: which
    gathered tokens count."""
    page = torch.arange(p, device=num_pages.device)[:, None]  # (P, 1)
    tok = torch.arange(g, device=num_pages.device)[None, :]  # (1, G)
    n = num_pages.long()[..., None, None]  # (B, H_kv, 1, 1)
    last = last_page_len.long()[:, None, None, None]  # (B, 1, 1, 1)
    ok = (page < n - 1) | ((page == n - 1) & (tok < last))  # (B, H_kv, P, G)
    if first_token is not None:
        ok &= page * g + tok >= first_token.long()[:, None, None, None]
    return ok.flatten(2)


def sparse_attention_ref(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
    last_page_len: torch.Tensor,
    scale: float,
    softcap: float | None = None,
    first_token: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the listed pages, mask, exact float32 softmax. See the module contract."""
    num_pages = check_inputs(q, kv_pool, page_table, num_pages, last_page_len, first_token)
    b, h_q, d = q.shape
    _, _, h_kv, g, _ = kv_pool.shape
    rep, p = h_q // h_kv, page_table.shape[2]
    slots = page_table.long()  # (B, H_kv, P)
    head = torch.arange(h_kv, device=q.device)[None, :, None]  # (1, H_kv, 1)
    k = kv_pool[slots, 0, head].reshape(b, h_kv, p * g, d).float()  # (B, H_kv, P*G, D)
    v = kv_pool[slots, 1, head].reshape(b, h_kv, p * g, d).float()
    qf = q.float().view(b, h_kv, rep, d)  # (B, H_kv, R, D)
    logits = (qf @ k.transpose(-1, -2)) * scale  # (B, H_kv, R, P*G)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    mask = token_mask(num_pages, last_page_len, p, g, first_token)[:, :, None, :]  # (B, H_kv, 1, P*G)
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # (B, H_kv, R)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(logits - lse_safe[..., None])  # exp(-inf) = 0 where masked or empty
    out = probs @ v  # (B, H_kv, R, D)
    return out.reshape(b, h_q, d).to(q.dtype), lse.reshape(b, h_q)
