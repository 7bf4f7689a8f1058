"""One point of ``kvdrive bench decode``'s sweep (``Shape``: model, dtype, batch, context) and the
command line's options that every system reads (``Options``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvdrive.cache.sparse import SparseConfig
from kvdrive.config import ModelConfig
from kvdrive.tiered.config import TieredConfig

GIB = 1 << 30


@dataclass(frozen=True)
class Options:
    """What the command line sets, the same for every system that reads it."""

    sparse: SparseConfig  # budget, groups, sinks, window: identical for every sparse system
    cache_tokens: int | str  # kvdrive's GPU selection cache, tokens per sequence per layer on average, or 'auto'
    eviction: str  # kvdrive_host's and kvdrive_ssd's eviction ("lookahead" | "lru")
    prefetch: bool  # the tiered systems predict and prefetch layer l+1's groups
    overlap: bool  # copies on a side stream (streaming and the tiered caches)
    # The tiered caches' settings default to TieredConfig's, so the benchmark runs what users get.
    rebalance_after: int = TieredConfig.rebalance_after  # decode steps before layer capacities follow misses
    disk: tuple[str, ...] = ("bench/decode-disk",)  # kvdrive_ssd: disk pool directories
    disk_gib: float = 48.0  # kvdrive_ssd: most disk bytes per directory
    ssd_host_gib: float = 8.0  # kvdrive_ssd: pinned host arena in front of the disks, all layers
    micro_batches: int | str = TieredConfig.micro_batches  # kvdrive systems: batch parts on their own streams
    prefetch_min_precision: float = TieredConfig.prefetch_min_precision  # a layer's prefetch stops below this
    fetch_programs: int | str = TieredConfig.fetch_programs  # kvdrive systems: looping programs of the fetch kernel
    fetch_lane: bool = TieredConfig.fetch_lane  # kvdrive systems with micro-batches: parts fetch in turn
    control_stream: bool = TieredConfig.control_stream  # kvdrive systems: score/select/ensure at highest priority
    disk_misses: str = TieredConfig.disk_misses  # kvdrive_ssd, kvswap_ssd: wait for disk-only groups, or defer them
    kv_dtype: str = TieredConfig.kv_dtype  # the tiered systems: storage format of their host and disk tiers


@dataclass(frozen=True)
class Shape:
    """One (context, batch) point of the sweep."""

    config: ModelConfig
    dtype: torch.dtype
    batch: int
    context: int  # tokens per sequence the cache is sized for; decoding ends there
    decode_room: int  # tokens decoded (warm-up + timed): the fill stops this far short of context

    @property
    def kv_token(self) -> int:
        return self.config.kv_bytes_per_token(self.dtype)

    @property
    def filled(self) -> int:
        return self.context - self.decode_room

    @property
    def all_kv(self) -> int:
        """KV of the whole batch at ``context``."""
        return self.batch * self.config.kv_bytes_at(self.context, self.dtype)
