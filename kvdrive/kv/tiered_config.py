"""``TieredConfig``: what the tiered cache keeps where and how it moves it (validated)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvdrive.errors import KvdriveError
from kvdrive.kv.pool import PoolPath
from kvdrive.kv.selection_cache import EVICTIONS
from kvdrive.kv.sparse import SparseConfig


@dataclass(frozen=True)
class TieredConfig:
    """``cache_tokens``: GPU selection-cache size per sequence and layer, averaged over the
    sparse layers (each layer gets at least the pages one selection takes)."""

    sparse: SparseConfig = field(default_factory=lambda: SparseConfig(budget=2048, sink_tokens=64, window_tokens=256))
    cache_tokens: int = 4096
    eviction: str = "lookahead"  # lookahead | lru | none (no cross-step reuse)
    prefetch: bool = True  # predict and fetch layer l+1's groups while layer l computes
    overlap: bool = True  # prefetch on a side stream (False: on the compute stream, ablation)
    rebalance_after: int = 16  # decode steps before capacities follow measured misses; 0: never
    # Initial placement by importance: once a prompt is prefilled (``place``), the groups its last
    # query selects are loaded into each layer's GPU cache (and, with a disk tier, read into the
    # host arena as most recently used), so the first decode step starts warm.
    warm_start: bool = True
    # At the rebalance, a layer keeps prefetching only if this share of what its prefetch
    # fetched was then selected (a wrong prediction costs the bandwidth of its fetch); 0: always.
    prefetch_min_precision: float = 0.5
    disk: tuple[PoolPath, ...] = ()  # disk pool paths: host memory becomes an arena in front of them
    host_bytes: int = 0  # with disk: pinned host arena, all layers together
    direct: str = "auto"  # O_DIRECT for the disk pool: auto | on | off
    # Decode batch parts on their own streams, so one part's fetch may overlap another's compute;
    # 1: off. Off by default: on the H100 it was slower (each part reads the weights again).
    micro_batches: int = 1
    # Programs of the host -> GPU fetch kernel. 0: one per (group, block), as many SMs as it
    # gets; N: N looping programs, so the copy leaves the other SMs to a micro-batch's compute.
    fetch_programs: int = 0

    def __post_init__(self):
        if self.disk and self.host_bytes <= 0:
            raise KvdriveError("with disk paths, set host_bytes (the pinned host arena in front of the disks)")
        if self.eviction not in EVICTIONS:
            raise KvdriveError(f"eviction must be one of {', '.join(EVICTIONS)}, got {self.eviction!r}")
        if self.sparse.mode != "shared":
            raise KvdriveError("the tiered cache selects whole groups shared by a layer's heads: use mode='shared'")
        if self.micro_batches < 1:
            raise KvdriveError(f"micro_batches must be >= 1 (1: no micro-batching), got {self.micro_batches}")
        if self.cache_tokens < 0 or self.rebalance_after < 0 or self.fetch_programs < 0:
            raise KvdriveError("cache_tokens, rebalance_after and fetch_programs must be >= 0")
        if not 0 <= self.prefetch_min_precision <= 1:
            raise KvdriveError(f"prefetch_min_precision is a share of fetched groups, 0..1, got {self.prefetch_min_precision}")
