"""The tiered cache: full KV on host, a GPU selection cache per layer. It must attend to exactly
what the GPU-resident sparse cache attends to (same selection), whatever the eviction,
prefetch and cache size; with a budget covering the context it is full attention."""

import pytest
import torch
from factories import CPU, F32
from factories import decode_steps as _decode
from factories import disk_config as _disk_cfg
from factories import random_prompts as _prompts
from factories import tiny_model as _tiny

from kvdrive.cache.contiguous import ContiguousKVCache
from kvdrive.cache.sparse import SparseConfig, SparseKVCache
from kvdrive.errors import KvdriveError
from kvdrive.tiered.cache import TieredConfig, TieredSparseKVCache


@pytest.mark.parametrize("eviction,prefetch", [("lookahead", True), ("none", False)])
def test_full_budget_equals_full_attention(eviction, prefetch):
    model, prompts = _tiny(), _prompts()
    ref = _decode(model, ContiguousKVCache(model.config, 3, 400, CPU, F32), prompts, 10)
    cfg = TieredConfig(
        SparseConfig(group_tokens=8, budget=10_000),
        cache_tokens=64,
        eviction=eviction,
        prefetch=prefetch,
        rebalance_after=5,
    )
    got = _decode(model, TieredSparseKVCache(model.config, 3, 400, CPU, F32, cfg), prompts, 10)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "summary,eviction,cache_tokens",
    [
        ("minmax", "lookahead", 96),
        ("lowrank_seq", "lookahead", 400),
        ("minmax", "lru", 96),
        ("lowrank_seq", "none", 0),
        ("tokenmax", "lookahead", 96),
    ],
)
def test_small_budget_matches_the_gpu_resident_sparse_cache(summary, eviction, cache_tokens):
    """Same summaries, same selection, attention over cached copies: same logits as SparseKVCache.
    A cache smaller than the context forces evictions and refetches on every step."""
    model, prompts = _tiny(), _prompts()
    sparse = SparseConfig(group_tokens=8, budget=48, sink_tokens=8, window_tokens=16, summary=summary, rank=8)
    ref = _decode(model, SparseKVCache(model.config, 3, 400, CPU, F32, sparse), prompts, 24)
    cache = TieredSparseKVCache(
        model.config,
        3,
        400,
        CPU,
        F32,
        TieredConfig(sparse, cache_tokens=cache_tokens, eviction=eviction, rebalance_after=6),
    )
    got = _decode(model, cache, prompts, 24)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    stats = cache.stats()
    assert stats["groups_selected"] == stats["gpu_hits"] + stats["prefetched_hits"] + stats["sync_fetched"]
    if eviction == "none":
        assert stats["gpu_hits"] == 0  # no reuse across steps: only this step's prefetch can hit
    else:
        assert stats["gpu_hits"] > stats["sync_fetched"]  # consecutive selections overlap
    assert stats["prefetched"] > 0 and stats["prefetched_hits"] > 0


def test_sliding_layers_and_prefill_are_exact():
    model = _tiny(
        "gemma3_text",
        head_dim=16,
        sliding_window=24,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    prompts = _prompts((90, 61))
    sparse = SparseConfig(group_tokens=8, budget=32, sink_tokens=8, window_tokens=16)
    ref = _decode(model, SparseKVCache(model.config, 2, 400, CPU, F32, sparse), prompts, 12)
    cfg = TieredConfig(sparse, cache_tokens=48)
    cache = TieredSparseKVCache(model.config, 2, 400, CPU, F32, cfg)
    got = _decode(model, cache, prompts, 12)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert sorted(cache.rings) == [0, 2]  # the sliding layers decode from their GPU rings
    cache.reset_stats()
    b = cache.plan([0, 1], 1)
    model(torch.full((2, 1), 5), cache, b)
    cache.commit(b)
    assert cache.stats()["bytes_host_to_gpu"] < 2 * 2 * cache.group_bytes * 3  # no window gathered from host


def test_rebalance_follows_misses_and_keeps_one_selection_per_layer():
    model = _tiny()
    cfg = TieredConfig(
        SparseConfig(group_tokens=8, budget=48, sink_tokens=8, window_tokens=16), cache_tokens=96, rebalance_after=0
    )
    cache = TieredSparseKVCache(model.config, 3, 400, CPU, F32, cfg)
    _decode(model, cache, _prompts(), 10)
    before = sum(c.capacity for c in cache.caches.values())
    misses = cache.stats()["misses_per_layer"]
    cap = cache.rebalance()
    assert sum(cap.values()) <= before and min(cap.values()) >= cache.max_pages
    most, least = max(misses, key=misses.get), min(misses, key=misses.get)
    if misses[most] > misses[least]:
        assert cap[most] >= cap[least]
    big = TieredSparseKVCache(
        model.config, 3, 400, CPU, F32, TieredConfig(cfg.sparse, cache_tokens=380, rebalance_after=0)
    )
    _decode(model, big, _prompts(), 4)
    assert max(big.rebalance().values()) <= big.n  # never more pages than a sequence has groups


@pytest.mark.parametrize("threshold", [0.0, 0.9])
def test_prefetch_stops_on_layers_whose_prediction_misses(threshold):
    """At the rebalance each layer's prefetch precision (prefetched groups later selected / groups
    prefetched) decides whether it keeps prefetching; logits never change. Layer 2's prediction
    is replaced by noise here, so it prefetches the wrong groups."""
    model, prompts = _tiny(), _prompts()
    sparse = SparseConfig(group_tokens=8, budget=48, sink_tokens=8, window_tokens=16)
    ref = _decode(model, SparseKVCache(model.config, 3, 400, CPU, F32, sparse), prompts, 14)
    cache = TieredSparseKVCache(
        model.config,
        3,
        400,
        CPU,
        F32,
        TieredConfig(sparse, cache_tokens=96, rebalance_after=6, prefetch_min_precision=threshold),
    )
    assert cache.hint_layers == frozenset(cache.sparse_layers) - {0}  # nothing runs before layer 0
    gen, counts = torch.Generator().manual_seed(3), {}
    real_hint, real_adapt = cache.hint, cache.adapt_prefetch

    def hint(layer, q_pred, batch):
        real_hint(layer, torch.randn(q_pred.shape, generator=gen) * 10 if layer == 2 else q_pred, batch)

    def adapt():
        counts.update({l: cache.caches[l].counts() for l in cache.sparse_layers})
        return real_adapt()

    cache.hint, cache.adapt_prefetch = hint, adapt
    got = _decode(model, cache, prompts, 14)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert counts, "the rebalance step adapts the prefetch"
    precision = {l: c["prefetched_hits"] / max(c["prefetched"], 1) for l, c in counts.items()}
    assert precision[2] < 0.9 <= precision[1], precision
    expect = {
        l
        for l, c in counts.items()
        if l > 0 and (c["prefetched"] == 0 or c["prefetched_hits"] >= threshold * c["prefetched"])
    }
    assert cache.hint_layers == expect
    assert (2 in expect) == (threshold == 0.0)


@pytest.mark.parametrize("eviction", ["lookahead", "none"])
def test_disk_backed_host_matches_the_gpu_resident_cache(tmp_path, eviction):
    """Host arena of 40 groups per layer for 3 sequences of ~26 groups: most groups live only
    on disk and come back through O_DIRECT-style extent reads; logits are unchanged."""
    model, prompts = _tiny(), _prompts()
    sparse = SparseConfig(group_tokens=8, budget=48, sink_tokens=8, window_tokens=16, summary="tokenmax")
    ref = _decode(model, SparseKVCache(model.config, 3, 400, CPU, F32, sparse), prompts, 12)
    cache = TieredSparseKVCache(
        model.config, 3, 400, CPU, F32, _disk_cfg(tmp_path, sparse, 40, cache_tokens=96, eviction=eviction)
    )
    got = _decode(model, cache, prompts, 12)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    st = cache.stats()
    assert st["disk_reads"] > 0 and st["host_evictions"] > 0 and st["lost"] == 0
    assert st["read_ahead"] > 0  # predicted disk groups read while the layer before computed
    assert st["disk_writes"] >= sum(len(p) // 8 for p in prompts) * 3  # every full group of every layer


def _prefill_chunked(model, cache, prompts, chunk=37):
    """The prompts prefilled together in ``chunk``-token steps (group boundaries fall inside
    chunks), each sequence's remainder alone."""
    for i in range(len(prompts)):
        cache.add(i, 400)
    done = [0] * len(prompts)
    while True:
        ids = [i for i, p in enumerate(prompts) if len(p) - done[i] >= chunk]
        if not ids:
            break
        b = cache.plan(ids, chunk)
        model(torch.tensor([prompts[i][done[i] : done[i] + chunk] for i in ids]), cache, b)
        cache.commit(b)
        for i in ids:
            done[i] += chunk
    for i, p in enumerate(prompts):
        if done[i] < len(p):
            b = cache.plan([i], len(p) - done[i])
            model(torch.tensor([p[done[i] :]]), cache, b)
            cache.commit(b)


def _decode_only(model, cache, num_seqs, steps):
    out = []
    for t in range(steps):
        b = cache.plan(list(range(num_seqs)), 1)
        out.append(model(torch.full((num_seqs, 1), 7 + t), cache, b))
        cache.commit(b)
    return torch.stack(out, 1)


@pytest.mark.parametrize("disk", [False, True])
def test_chunked_batched_prefill_writes_whole_groups_exactly(tmp_path, disk):
    """Prefill chunks write the groups they cover whole as rows and summarize them from the GPU
    copy; the partial groups at chunk ends go token by token. Host KV, summaries and logits
    must equal a one-shot prefill into the GPU-resident sparse cache."""
    model, prompts = _tiny(), _prompts()
    sparse = SparseConfig(group_tokens=8, budget=48, sink_tokens=8, window_tokens=16)
    ref_cache = SparseKVCache(model.config, 3, 400, CPU, F32, sparse)
    ref = _decode(model, ref_cache, prompts, 6)
    cfg = _disk_cfg(tmp_path, sparse, 200, cache_tokens=96) if disk else TieredConfig(sparse, cache_tokens=96)
    cache = TieredSparseKVCache(model.config, 3, 400, CPU, F32, cfg)
    _prefill_chunked(model, cache, prompts)
    for layer in cache.sparse_layers:  # summarized during prefill, not at the first decode step
        assert cache.summaries.done[layer][:3] == [len(p) // 8 for p in prompts]
    got = _decode_only(model, cache, len(prompts), 6)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for layer in range(model.config.num_hidden_layers):
        for i, p in enumerate(prompts):
            k, v = cache.export_kv(i, layer, 0, len(p) + 6)
            k_ref, v_ref = ref_cache.export_kv(i, layer, 0, len(p) + 6)
            torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("disk", [False, True])
def test_warm_start_places_the_prompts_important_groups_before_the_first_step(tmp_path, disk):
    """``place`` after prefill puts the last prompt query's selection in the GPU cache (and in
    the host arena): the first decode step hits where a cold start misses, reads less from
    disk, and computes the same logits."""
    model, prompts = _tiny(), _prompts()
    sparse = SparseConfig(group_tokens=8, budget=48, sink_tokens=8, window_tokens=16)
    firsts, stats = [], []
    for warm in (False, True):
        kw = {"cache_tokens": 96, "warm_start": warm, "prefetch": False}
        (tmp_path / str(warm)).mkdir()
        cfg = _disk_cfg(tmp_path / str(warm), sparse, 30, **kw) if disk else TieredConfig(sparse, **kw)
        cache = TieredSparseKVCache(model.config, 3, 400, CPU, F32, cfg)
        _decode(model, cache, prompts, 0)
        assert cache.stats()["bytes_warm_start"] == 0  # placement waits for the end of the prompts
        cache.place([0, 1, 2])
        assert (cache.stats()["bytes_warm_start"] > 0) == warm
        cache.reset_stats()
        firsts.append(_decode_only(model, cache, len(prompts), 1))
        stats.append(cache.stats())
        cache.close()
    torch.testing.assert_close(firsts[1], firsts[0], rtol=1e-5, atol=1e-5)
    cold, warm = stats
    assert cold["gpu_hits"] == 0 and warm["gpu_hits"] > 0.5 * warm["groups_selected"]
    assert warm["sync_fetched"] < cold["sync_fetched"]
    if disk:
        assert warm["disk_reads"] < cold["disk_reads"]


def test_failed_disk_reads_are_dropped_not_served(tmp_path):
    """Once decoding, a group whose disk read fails leaves the attention of that step (counted as
    lost); where a whole span is needed (summaries, prefill) the error names the fix."""
    from kvdrive.errors import KvdriveError
    from kvdrive.storage.io_engine import InjectedFaults

    model, prompts = _tiny(), _prompts()
    sparse = SparseConfig(group_tokens=8, budget=48, sink_tokens=8, window_tokens=16)
    cache = TieredSparseKVCache(model.config, 3, 400, CPU, F32, _disk_cfg(tmp_path, sparse, 40, cache_tokens=48))
    _decode(model, cache, prompts, 2)  # prefill + summaries built while the disk is healthy
    faults = InjectedFaults().fail("read", times=-1)
    for dev in cache.host.pool.devices:
        dev.faults = faults
    for t in range(6):
        b = cache.plan([0, 1, 2], 1)
        out = model(torch.full((3, 1), 9 + t), cache, b)
        cache.commit(b)
        assert torch.isfinite(out).all()
    assert cache.stats()["lost"] > 0 and faults.fired > 0
    with pytest.raises(KvdriveError, match="prefilled again"):
        cache.export_kv(0, 1, 0, 150)


def test_per_head_mode_is_refused_with_the_fix():
    with pytest.raises(KvdriveError, match="mode='shared'"):
        TieredConfig(SparseConfig(mode="per_head"))


@pytest.mark.gpu
@pytest.mark.parametrize("eviction", ["lookahead", "none"])
def test_gpu_tiered_matches_sparse_cache(eviction):
    """Pinned host + UVA kernels + side-stream prefetch on the GPU agree with the GPU-resident cache."""
    model = _tiny().to("cuda", torch.bfloat16)
    prompts, dev, bf = _prompts(), torch.device("cuda"), torch.bfloat16
    sparse = SparseConfig(group_tokens=8, budget=48, sink_tokens=8, window_tokens=16)
    ref = _decode(model, SparseKVCache(model.config, 3, 400, dev, bf, sparse), prompts, 24)
    cache = TieredSparseKVCache(model.config, 3, 400, dev, bf, TieredConfig(sparse, cache_tokens=96, eviction=eviction))
    got = _decode(model, cache, prompts, 24)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    assert cache.stats()["prefetched_hits"] > 0


def test_prefetch_precision_counts_only_prefetches_since_the_reset():
    """A slot filled by a prefetch before ``reset_stats`` and selected after it is not a prefetch
    hit of the new period: per layer, prefetch hits never exceed prefetches (with a cache as
    large as the context such slots live long, and precision read above 1)."""
    model, prompts = _tiny(), _prompts()
    sparse = SparseConfig(group_tokens=8, budget=48, sink_tokens=8, window_tokens=16)
    cache = TieredSparseKVCache(
        model.config,
        3,
        400,
        CPU,
        F32,
        TieredConfig(sparse, cache_tokens=400, rebalance_after=0, prefetch_min_precision=0),
    )
    gen, real_hint = torch.Generator().manual_seed(5), cache.hint

    def hint(layer, q_pred, batch):  # a noisy prediction: prefetched groups are selected only later, if ever
        real_hint(layer, q_pred + torch.randn(q_pred.shape, generator=gen) * 3, batch)

    cache.hint = hint
    _decode(model, cache, prompts, 8)
    cache.reset_stats()
    ids = torch.full((3, 1), 11)
    for _ in range(8):
        b = cache.plan([0, 1, 2], 1)
        model(ids, cache, b)
        cache.commit(b)
    per_layer = {l: c.counts() for l, c in cache.caches.items()}
    assert sum(c["prefetched_hits"] for c in per_layer.values()) > 0
    for layer, c in per_layer.items():
        assert c["prefetched_hits"] <= c["prefetched"], (layer, c)


@pytest.mark.parametrize("stamp_hits", [True, False])
def test_arena_keeps_what_the_gpu_cache_hits(tmp_path, stamp_hits):
    """The host arena's LRU counts every group a step selects, GPU-cache hits too: a group the
    GPU cache serves every step is still in host memory when that cache lets it go. Passing only
    the misses (the old behaviour) lets it age out to disk while it is the hottest group."""
    import numpy as np

    from kvdrive.storage.layout import GroupLayout
    from kvdrive.storage.pool import PoolPath
    from kvdrive.tiered.disk_host_kv import DiskBackedHostKV

    layout, n, chunk = GroupLayout(1, 1, 8, F32, 4), 16, 4
    kv = DiskBackedHostKV(layout, 1, n + 4, CPU, 6 * layout.slot_bytes, (PoolPath(str(tmp_path), 1 << 20),))
    for first in range(0, n, chunk):  # prefill 4 groups at a time: the arena holds 6
        kv.begin([0], (first * 4,), chunk * 4)
        kv.end([0], (first * 4,), chunk * 4, kv._last_step)
        kv._reap(wait_all=True)
    hot = 0
    assert kv.index.slot_of[0, 0, hot] < 0  # aged out during the prefill: the first pick reads it from disk
    kv.begin([0], (n * 4,), 1)  # the first decode step
    kv.resolve(0, [0], np.array([[hot]]), np.array([[True]]))
    kv.end([0], (n * 4,), 1, kv._last_step)
    for step, g in enumerate(
        range(4, n), start=1
    ):  # each step: the hot group hits the GPU cache, one new group misses it
        kv.begin([0], (n * 4 + step,), 1)  # a decode step (its token's open group takes a slot too)
        groups, need = np.array([[hot, g]]), np.array([[False, True]])
        kv.resolve(0, [0], groups, need, np.ones_like(need) if stamp_hits else None)
        kv.end([0], (n * 4 + step,), 1, kv._last_step)
    assert (kv.index.slot_of[0, 0, hot] >= 0) == stamp_hits
    assert kv.counts["lost"] == 0
    kv.close()
