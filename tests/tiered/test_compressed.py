"""Compressed host and disk tiers (``TieredConfig.kv_dtype``): full groups stored quantized, the
open group exact. Decode must attend to exactly what the GPU-resident sparse cache attends to
when it simulates the same format (``SparseConfig.kv_dtype``): each full group as the format's
round trip returns it, the partly filled group exact, summaries from the exact keys."""

from dataclasses import replace

import pytest
import torch
from factories import CPU, F32
from factories import decode_steps as _decode
from factories import disk_config as _disk_cfg
from factories import random_prompts as _prompts
from factories import tiny_model as _tiny

from kvdrive.cache.sparse import SparseConfig, SparseKVCache
from kvdrive.errors import KvdriveError
from kvdrive.tiered.cache import TieredConfig, TieredSparseKVCache

SPARSE = SparseConfig(group_tokens=8, budget=48, sink_tokens=8, window_tokens=16, summary="tokenmax")


def _config(tmp_path, disk: bool, **kw) -> TieredConfig:
    return (
        _disk_cfg(tmp_path, SPARSE, 40, cache_tokens=96, **kw) if disk else TieredConfig(SPARSE, cache_tokens=96, **kw)
    )


@pytest.mark.parametrize("disk", [False, True])
@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_compressed_tiers_match_the_gpu_resident_cache_in_the_same_format(tmp_path, fmt, disk):
    """Prompts of 150, 77 and 203 tokens (partly filled last groups at G=8), 12 decode steps: every
    sequence crosses a group boundary (its open group is sealed mid-decode)."""
    model, prompts = _tiny(), _prompts()
    ref = _decode(model, SparseKVCache(model.config, 3, 400, CPU, F32, replace(SPARSE, kv_dtype=fmt)), prompts, 12)
    cache = TieredSparseKVCache(model.config, 3, 400, CPU, F32, _config(tmp_path, disk, kv_dtype=fmt))
    got = _decode(model, cache, prompts, 12)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    exact = _decode(model, SparseKVCache(model.config, 3, 400, CPU, F32, SPARSE), prompts, 12)
    assert (got - exact).abs().max() > 1e-4  # the format is applied, not bypassed
    st = cache.stats()
    assert st["kv_dtype"] == fmt and st["sync_fetched"] > 0 and st["gpu_hits"] > 0
    if disk:
        assert st["disk_reads"] > 0 and st["lost"] == 0


def _chunked_then_decode(model, cache, prompts, chunk: int, steps: int) -> torch.Tensor:
    """Each prompt prefilled in ``chunk``-token steps (chunk ends fall inside groups, and some
    chunks fill the group the one before left open), then ``steps`` batched decode steps."""
    for i, p in enumerate(prompts):
        cache.add(i, 400)
        for a in range(0, len(p), chunk):
            b = cache.plan([i], len(p[a : a + chunk]))
            model(torch.tensor([p[a : a + chunk]]), cache, b)
            cache.commit(b)
    out = []
    for t in range(steps):
        b = cache.plan(list(range(len(prompts))), 1)
        out.append(model(torch.full((len(prompts), 1), 7 + t), cache, b))
        cache.commit(b)
    return torch.stack(out, 1)


@pytest.mark.parametrize("disk", [False, True])
@pytest.mark.parametrize("chunk", [5, 37])
def test_chunked_prefill_seals_the_groups_it_fills(tmp_path, chunk, disk):
    """A chunk writes the head of its first group into the open row and seals it when full, then
    its whole groups quantized, then its tail: the same decode as a one-shot prefill into the
    GPU-resident cache in the same format, every full group summarized from exact keys."""
    model, prompts = _tiny(), _prompts()
    ref = _decode(model, SparseKVCache(model.config, 3, 400, CPU, F32, replace(SPARSE, kv_dtype="fp8")), prompts, 10)
    cache = TieredSparseKVCache(model.config, 3, 400, CPU, F32, _config(tmp_path, disk, kv_dtype="fp8"))
    got = _chunked_then_decode(model, cache, prompts, chunk, 10)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for layer in cache.sparse_layers:
        assert cache._summarized[layer][:3] == [(len(p) + 10) // 8 for p in prompts]


def test_deferred_disk_misses_serve_the_open_group_exact(tmp_path):
    """``disk_misses="defer"`` with an arena that holds every group: nothing is left out, so the
    deferred path's fetch (its source rows from the arena map, the open group redirected to its
    exact row) gives the same logits."""
    model, prompts = _tiny(), _prompts()
    ref = _decode(model, SparseKVCache(model.config, 3, 400, CPU, F32, replace(SPARSE, kv_dtype="int4")), prompts, 10)
    cfg = _disk_cfg(tmp_path, SPARSE, 200, cache_tokens=96, kv_dtype="int4", disk_misses="defer")
    got = _decode(model, TieredSparseKVCache(model.config, 3, 400, CPU, F32, cfg), prompts, 10)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bad_settings_are_refused_with_the_fix():
    with pytest.raises(KvdriveError, match="kv_dtype must be one of"):
        TieredConfig(SPARSE, kv_dtype="fp4")
    with pytest.raises(KvdriveError, match="lowrank_seq"):
        TieredConfig(replace(SPARSE, summary="lowrank_seq"), kv_dtype="fp8")
    with pytest.raises(KvdriveError, match="set TieredConfig.kv_dtype"):
        TieredConfig(replace(SPARSE, kv_dtype="fp8"))
