"""Fit the offline low-rank key bases (``lowrank_offline``, KVSwap) on calibration text."""

from __future__ import annotations

import torch

from kvdrive.cache.contiguous import ContiguousKVCache
from kvdrive.retrieval.lowrank import KeyGram


@torch.inference_mode()
def fit_bases(lm, rows: list[list[int]], rank: int) -> dict[int, torch.Tensor]:
    """Prefill each calibration row and accumulate every global layer's post-RoPE keys;
    returns {layer: (H_kv*D, rank) basis}. The rows must not overlap the evaluation text."""
    cfg, dev = lm.config, lm.model.device
    grams = {layer: KeyGram(cfg.num_key_value_heads, cfg.head_dim, dev) for layer in cfg.global_layers}
    for ids in rows:
        cache = ContiguousKVCache(cfg, 1, len(ids), dev, lm.model.dtype)
        cache.add(0, len(ids))
        for begin in range(0, len(ids), 2048):
            piece = torch.tensor(ids[begin : begin + 2048], device=dev)[None]
            batch = cache.plan([0], piece.shape[1])
            lm.model(piece, cache, batch)
            cache.commit(batch)
        for layer, gram in grams.items():
            k, _ = cache.export_kv(0, layer, 0, len(ids))  # (H_kv, T, D)
            gram.add(k.transpose(0, 1).float())
    return {layer: gram.basis(rank) for layer, gram in grams.items()}
