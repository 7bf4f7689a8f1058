"""Filling the decode benchmark's contexts before timing: seeded random K/V through each
cache's own path (``fill_random``, no model), or a real prefill of prose (``fill_text``)."""

from __future__ import annotations

import torch

from kvdrive.cache.base import KVCache


def fill_random(
    cache: KVCache,
    seq_ids,
    length: int,
    config,
    device: torch.device,
    dtype: torch.dtype,
    chunk: int = 8192,
    seed: int = 0,
) -> None:
    """Give every sequence in ``seq_ids`` (already added) ``length`` tokens of seeded N(0, 1)
    K and V through the cache's normal path, ``chunk`` tokens per plan/append/commit, then
    ``place`` (no queries were seen, so it only ends the prompt); no model, no attention."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h, d = config.num_key_value_heads, config.head_dim
    for seq in seq_ids:
        done = cache.length(seq)
        while done < length:
            t = min(chunk, length - done)
            batch = cache.plan([seq], t)
            for layer in range(config.num_hidden_layers):
                k = torch.randn(1, h, t, d, generator=gen, device=device, dtype=dtype)  # (1, H_kv, T, D)
                v = torch.randn(1, h, t, d, generator=gen, device=device, dtype=dtype)
                cache.append(layer, k, v, batch)
            cache.commit(batch)
            done += t
        cache.place([seq])  # the prompt is done, as the engine says: a tiered prefill stage goes


def fill_text(model, cache: KVCache, seq_ids, length: int, haystack, chunk: int, seed: int) -> torch.Tensor:
    """Prefill every sequence with ``length`` tokens of real prose (its own random start in the
    text), ``chunk`` tokens per forward; returns each one's greedy next token (B, 1)."""
    import random

    rng, first = random.Random(seed), []
    for seq in seq_ids:
        ids = torch.tensor(haystack.sample(length, rng), device=model.device)
        for a in range(0, length, chunk):
            part = ids[a : a + chunk]
            batch = cache.plan([seq], len(part))
            logits = model(part[None], cache, batch)
            cache.commit(batch)
        cache.place([seq])  # the tiered caches' initial placement, as the engine does
        first.append(logits.argmax(-1))
    return torch.stack(first).reshape(-1, 1)
