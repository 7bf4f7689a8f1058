"""``tokenmax``: every token's key kept in 2 bits per channel, a group scored by its best token.

A mean key hides a spike: one token that a retrieval head attends to (a pass key's digit,
the value of a looked-up key) moves its group's mean logit by 1/G of the spike, and recent
text outranks it. Here each group keeps, per KV head, the per-channel min and max of its
keys (float16) and every token's key quantized to 2 bits per channel within that range
(``lo + code * (hi - lo) / 3``). A query scores each token with the dequantized keys and
the group takes the max over its tokens: the spike survives. Cost per token and head:
``D / 2`` bytes (``D / 4`` of codes, ``D / 4`` of the range at G = 16), a quarter of its
bf16 key.

Layout of one group's summary, per KV head, as bytes: ``[lo: D x fp16 | hi: D x fp16 |
codes: G * D / 4]``; code ``i = t * D + d`` sits in byte ``i // 4`` at bits ``2 * (i % 4)``.
"""

from __future__ import annotations

import torch

from kvdrive.errors import KvdriveError

BITS = 2
LEVELS = (1 << BITS) - 1  # 3: the codes 0..3 span [lo, hi]
PER_BYTE = 8 // BITS
RANGE_DTYPE = torch.float16  # lo and hi: two bytes each


def range_bytes(head_dim: int) -> int:
    """Bytes of one head's [lo | hi] in a group summary."""
    return 2 * head_dim * RANGE_DTYPE.itemsize


def summary_bytes(group_tokens: int, head_dim: int) -> int:
    """Bytes of one head's summary of one group."""
    if (group_tokens * head_dim) % PER_BYTE:
        raise KvdriveError(f"tokenmax needs group_tokens * head_dim divisible by {PER_BYTE}")
    return range_bytes(head_dim) + group_tokens * head_dim // PER_BYTE


def encode(keys: torch.Tensor) -> torch.Tensor:
    """keys (N, H, G, D) -> (N, H, summary_bytes) uint8."""
    n, h, g, d = keys.shape
    k = keys.float()
    lo = k.amin(dim=2).to(RANGE_DTYPE)  # (N, H, D)
    hi = k.amax(dim=2).to(RANGE_DTYPE)
    lo32, hi32 = lo.float()[:, :, None], hi.float()[:, :, None]
    step = (hi32 - lo32) / LEVELS
    code = torch.where(step > 0, (k - lo32) / step.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    code = code.round_().clamp_(0, LEVELS).to(torch.uint8).view(n, h, g * d // PER_BYTE, PER_BYTE)
    shifts = torch.arange(0, 8, BITS, dtype=torch.uint8, device=keys.device)
    packed = (code << shifts).sum(dim=-1, dtype=torch.uint8)  # (N, H, G*D/4): disjoint bits, sum == or
    head = torch.cat((lo, hi), dim=-1).contiguous().view(torch.uint8)  # (N, H, 4D)
    return torch.cat((head, packed), dim=-1)


def decode(summaries: torch.Tensor, group_tokens: int, head_dim: int) -> torch.Tensor:
    """(..., H, summary_bytes) uint8 -> dequantized keys (..., H, G, D) float32."""
    d, g = head_dim, group_tokens
    rb = range_bytes(d)
    head = summaries[..., :rb].contiguous().view(RANGE_DTYPE).float()  # (..., H, 2D)
    lo, hi = head[..., :d], head[..., d:]
    shifts = torch.arange(0, 8, BITS, dtype=torch.uint8, device=summaries.device)
    codes = (summaries[..., rb:, None] >> shifts) & LEVELS  # (..., H, G*D/4, 4)
    codes = codes.reshape(*summaries.shape[:-1], g, d).float()
    return lo[..., None, :] + codes * ((hi - lo) / LEVELS)[..., None, :]
