"""Fitting the low-rank key bases of ``lowrank_offline`` (KVSwap) and ``lowrank_seq`` (ShadowKV).

A basis A (H_kv*D, r) with orthonormal columns spans the top-r right singular vectors
of the key matrix K (tokens, H_kv*D) of one layer, all KV heads concatenated. We get
them from the (H_kv*D)^2 Gram matrix K^T K rather than an SVD of K: the Gram matrix
accumulates over any number of calibration sequences in O(H_kv*D)^2 memory, and its
eigenvectors are the right singular vectors. Not centered: we approximate dot
products ``q.k ~= (q A)(A^T k)``, so the mean direction belongs in the basis.

Keys are post-RoPE, the frame they are scored in (docs/attention.md says why).
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvdrive.errors import KvdriveError


class KeyGram:
    """Running K^T K (float64) of one layer's keys; ``basis(r)`` is the fitted projection."""

    def __init__(self, num_kv_heads: int, head_dim: int, device: torch.device | str = "cpu"):
        self.dim = num_kv_heads * head_dim
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.gram = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, keys: torch.Tensor) -> None:
        """keys (..., H_kv, D) or (N, H_kv, G, D) group-shaped; every token counts once."""
        if keys.dim() == 4:
            keys = keys.transpose(1, 2)  # (N, G, H_kv, D)
        if tuple(keys.shape[-2:]) != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"keys {tuple(keys.shape)} do not end in (H_kv={self.num_kv_heads}, D={self.head_dim})")
        flat = keys.reshape(-1, self.dim).to(self.gram.device, torch.float64)  # (T, H_kv*D)
        self.gram += flat.T @ flat
        self.tokens += flat.shape[0]

    def basis(self, rank: int) -> torch.Tensor:
        """(H_kv*D, rank) float32, columns orthonormal, by decreasing captured energy."""
        if not 0 < rank <= self.dim:
            raise KvdriveError(f"rank must be in 1..{self.dim}, got {rank}")
        if self.tokens == 0:
            raise KvdriveError("cannot fit a key basis on zero tokens")
        _, vecs = torch.linalg.eigh(self.gram)  # ascending eigenvalues
        return vecs[:, -rank:].flip(-1).float().contiguous()

    def captured(self, rank: int) -> float:
        """Fraction of the keys' energy (sum of squares) inside the top-``rank`` subspace."""
        vals = torch.linalg.eigvalsh(self.gram).clamp(min=0)
        return float(vals[-rank:].sum() / vals.sum())


def save_bases(path: str | Path, bases: dict[int, torch.Tensor], meta: dict | None = None) -> None:
    """Write {layer: basis (H_kv*D, r)} with free-form metadata (model, rank, tokens)."""
    torch.save({"bases": {int(k): v.cpu() for k, v in bases.items()}, "meta": meta or {}}, Path(path))


def load_bases(path: str | Path) -> tuple[dict[int, torch.Tensor], dict]:
    doc = torch.load(Path(path), map_location="cpu", weights_only=True)
    return doc["bases"], doc["meta"]
