"""``report``: the tiered cache's statistics (``TieredSparseKVCache.stats``), from its counters.

What decode selected, hit and fetched comes from each sparse layer's ``SelectionCache``
counters (on the device: one host sync per layer); the bytes moved outside those fetches are
counted where they move (the cache's token writes, ``Placement.moved``,
``TieredPrefill.dense_bytes``, the host tier's own ``stats``). Every count is since the last
``reset_stats``; sizes and settings are as they are now (``auto`` settings resolved).
"""

from __future__ import annotations

from kvdrive.tiered.config import TieredConfig
from kvdrive.tiered.selection_cache import SelectionCache


def report(
    caches: dict[int, SelectionCache],
    host,
    tiered: TieredConfig,
    *,
    steps: int,
    token_writes: int,
    warm_start: int,
    placed_from_disk: int,
    dense_bytes: int,
    summary_bytes: int,
    ring_bytes: int,
    micro_batches: int,
    fetch_lane: bool,
    prefetch_layers,
) -> dict:
    """``steps``: decode steps counted; ``token_writes``, ``warm_start``, ``placed_from_disk``,
    ``dense_bytes``: bytes moved by token writes to the host tier, the warm start's fetches, its
    disk reads and dense prefill gathers; ``summary_bytes``, ``ring_bytes``: GPU bytes held."""
    per_layer = {l: c.counts() for l, c in caches.items()}
    tot = {k: sum(c[k] for c in per_layer.values()) for k in ("hits", "prefetched_hits", "misses", "prefetched")}
    fetched = tot["misses"] + tot["prefetched"]
    selected = tot["hits"] + tot["misses"]
    return {
        "steps": steps,
        "groups_selected": selected,
        "gpu_hits": tot["hits"] - tot["prefetched_hits"],
        "prefetched_hits": tot["prefetched_hits"],
        "sync_fetched": tot["misses"],
        "prefetched": tot["prefetched"],
        "hit_rate": tot["hits"] / selected if selected else None,
        "bytes_host_to_gpu": fetched * host.fetch_bytes + dense_bytes + warm_start,
        "bytes_warm_start": warm_start,
        "bytes_placed_from_disk": placed_from_disk,
        "bytes_gpu_to_host": token_writes,
        "gpu_cache_bytes": sum(c.nbytes for c in caches.values()),
        "summary_bytes": summary_bytes,
        "window_ring_bytes": ring_bytes,
        "host_bytes": host.nbytes,
        "kv_dtype": tiered.kv_dtype,
        **host.stats(),
        "cache_tokens": tiered.cache_tokens,  # resolved where the config said "auto"
        "micro_batches": micro_batches,
        "fetch_programs": tiered.fetch_programs,  # resolved likewise
        "fetch_lane": fetch_lane,
        "control_stream": tiered.control_stream and tiered.micro_batches > 1,
        "capacity_per_layer": {l: c.capacity for l, c in caches.items()},
        "prefetch_layers": sorted(prefetch_layers),
        "prefetch_precision_per_layer": {
            l: c["prefetched_hits"] / c["prefetched"] for l, c in per_layer.items() if c["prefetched"]
        },
        "misses_per_layer": {l: c["misses"] for l, c in per_layer.items()},
    }
