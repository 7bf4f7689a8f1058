"""Exact merge of partial attentions by their log-sum-exp.

If ``o_a, lse_a`` is softmax attention over key set A and ``o_b, lse_b`` over a disjoint
set B (natural-log LSE of the scaled, capped logits), attention over A u B is

    lse = log(exp(lse_a) + exp(lse_b)),   o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b.

An empty part has ``lse = -inf`` and any finite ``o`` (we write 0); it drops out.
This is how a GPU part and a CPU (or second GPU) part of one step are combined.
"""

from __future__ import annotations

import torch


def merge_attention(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """o (..., D) in any float dtype, lse (...) float32 -> (o in o_a's dtype, lse float32)."""
    return merge_attention_many(torch.stack((o_a, o_b.to(o_a.dtype))), torch.stack((lse_a, lse_b)))


def merge_attention_many(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """o (S, ..., D), lse (S, ...): merge S partial attentions along dim 0."""
    lse = lse.float()
    m = lse.amax(dim=0)  # (...)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all parts empty -> weights 0
    w = torch.exp(lse - m_safe)  # (S, ...)
    total = w.sum(dim=0)  # (...)
    out = (w[..., None] * o.float()).sum(dim=0) / total.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    return out.to(o.dtype), m_safe + torch.log(total)
