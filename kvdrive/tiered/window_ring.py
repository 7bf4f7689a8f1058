"""The last ``window`` tokens of a sliding-window layer, per sequence, kept on the GPU.

A sliding-window layer attends only to its recent tokens, so the tiered cache keeps them
on the device in a ring: token at position p lives at ``p % window``. Decode attends over
the ring (softmax does not care about the order of keys; their RoPE is already applied)
instead of gathering the window from host memory at every step: Gemma 3 has 15 sliding
layers of 18, each of which did that gather. Every token still goes to the host tier too
(prefill, export and the prefix store read it there).

Valid entries at query position p: all ``window`` once p >= window - 1, else the first
p + 1. A slot's stale entries from an earlier sequence are never read: positions 0..p of
the current sequence have all been written by the time p attends.
"""

from __future__ import annotations

import torch

from kvdrive.cache.contiguous import grouped_sdpa


class WindowRing:
    def __init__(self, max_seqs: int, kv_heads: int, window: int, head_dim: int, device, dtype):
        self.window = window
        self.k = torch.zeros(max_seqs, kv_heads, window, head_dim, device=device, dtype=dtype)  # (S, H_kv, W, D)
        self.v = torch.zeros_like(self.k)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write(self, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (B, H_kv, T, D) of tokens at ``positions`` (B, T), sequences in ``slots`` (B,):
        the last ``window`` of them land in the ring (earlier ones would be overwritten)."""
        w = min(self.window, positions.shape[1])
        pos, k, v = positions[:, -w:], k[:, :, -w:], v[:, :, -w:]
        rows = slots[:, None].expand_as(pos)  # (B, w)
        self.k[rows, :, pos % self.window] = k.transpose(1, 2).to(self.k.dtype)  # (B, w, H_kv, D)
        self.v[rows, :, pos % self.window] = v.transpose(1, 2).to(self.v.dtype)

    def attend(
        self, q: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, scale: float, softcap: float | None
    ) -> torch.Tensor:
        """One decode query per sequence: q (B, H_q, 1, D) at ``positions`` (B, 1) -> (B, H_q, 1, D)."""
        valid = torch.arange(self.window, device=q.device)[None, :] <= positions  # (B, W)
        return grouped_sdpa(q, self.k[slots], self.v[slots], valid[:, None, None, :], scale, softcap)
