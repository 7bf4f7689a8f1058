"""The systems ``kvdrive bench decode`` compares: name -> how to build its cache, and which
estimates of ``memory.py`` give what it needs in GPU and host memory and what one decode step
must move (the roofline's inputs).

Every system but ``hf_offload`` is a ``KVCache`` decoded by kvdrive's own model, so the
numbers differ only by where the KV lives and how it moves. Factories import their
cache lazily.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kvdrive.bench.decode import memory as mem
from kvdrive.bench.decode.points import GIB, Options, Shape
from kvdrive.cache.base import KVCache


@dataclass(frozen=True)
class System:
    name: str
    about: str
    needs_cuda: bool
    build: Callable[[Shape, torch.device, Options], KVCache] | None  # None: not a kvdrive cache
    gpu_bytes: Callable[[Shape, Options], int]  # beyond the weights, estimated
    host_bytes: Callable[[Shape, Options], int]  # estimated, mostly pinned
    gpu_kv_read: Callable[[Shape, Options], int]  # KV + summary bytes attention reads per step
    pcie: str  # bytes host->GPU per step: "none", "all_kv" (the whole KV) or "measured" (cache stats)
    settle_steps: Callable[[Options], int] = lambda o: 0  # extra warm-up before the cache is in steady state
    disk_bytes: Callable[[Shape, Options], int] = mem.nothing  # written to the disk pool
    formats: bool = False  # a tiered system: runs once per --kv-dtype (its host and disk tiers' format)

    @property
    def on_disk(self) -> bool:
        """The system keeps KV on the disk pool (its roofline has a disk term)."""
        return self.disk_bytes is not mem.nothing


def _contiguous(s: Shape, device, o: Options) -> KVCache:
    from kvdrive.cache.contiguous import ContiguousKVCache

    return ContiguousKVCache(s.config, s.batch, s.context, device, s.dtype)


def _paged(s: Shape, device, o: Options) -> KVCache:
    from kvdrive.cache.paged import PagedKVCache

    return PagedKVCache(s.config, s.batch, s.context, device, s.dtype)


def _streaming(s: Shape, device, o: Options) -> KVCache:
    from kvdrive.cache.streaming import HostStreamingKVCache

    return HostStreamingKVCache(s.config, s.batch, s.context, device, s.dtype, overlap=o.overlap)


def _sparse_gpu(s: Shape, device, o: Options) -> KVCache:
    from kvdrive.cache.sparse import SparseKVCache

    return SparseKVCache(s.config, s.batch, s.context, device, s.dtype, o.sparse)


def _tiered(eviction: str | None):
    """sparse_host (eviction=None: no cross-step reuse) or kvdrive_host (the CLI's eviction)."""

    def build(s: Shape, device, o: Options) -> KVCache:
        from kvdrive.tiered.cache import TieredConfig, TieredSparseKVCache

        cfg = TieredConfig(
            sparse=o.sparse,
            cache_tokens=o.cache_tokens,
            eviction=eviction or o.eviction,
            prefetch=o.prefetch,
            overlap=o.overlap,
            rebalance_after=o.rebalance_after,
            prefetch_min_precision=o.prefetch_min_precision,
            micro_batches=1 if eviction else o.micro_batches,  # the baseline has no pipeline
            fetch_programs=0 if eviction else o.fetch_programs,
            fetch_lane=o.fetch_lane,
            control_stream=o.control_stream and not eviction,
            kv_dtype=o.kv_dtype,
        )
        return TieredSparseKVCache(s.config, s.batch, s.context, device, s.dtype, tiered=cfg)

    return build


DISK_SUBDIR = "kvdrive-bench-decode"  # made under each --disk directory per row, removed after it


def _tiered_ssd(s: Shape, device, o: Options, previous_step_only: bool = False) -> KVCache:
    """kvdrive_ssd, or (``previous_step_only``) KVSwap-style: the GPU cache holds one selection's
    pages (only what the last step selected can hit), LRU, capacities never rebalanced."""
    from kvdrive.storage.pool import PoolPath
    from kvdrive.tiered.cache import TieredConfig, TieredSparseKVCache

    budget = min(int(o.disk_gib * GIB), int(mem.stored_kv(s, o) / len(o.disk) * 1.25) + GIB)
    paths = []
    for d in o.disk:
        (Path(d) / DISK_SUBDIR).mkdir(parents=True, exist_ok=True)
        paths.append(PoolPath(str(Path(d) / DISK_SUBDIR), budget))
    cfg = TieredConfig(
        sparse=o.sparse,
        cache_tokens=0 if previous_step_only else o.cache_tokens,
        eviction="lru" if previous_step_only else o.eviction,
        prefetch=o.prefetch,
        overlap=o.overlap,
        rebalance_after=0 if previous_step_only else o.rebalance_after,
        disk=tuple(paths),
        host_bytes=int(o.ssd_host_gib * GIB),
        prefetch_min_precision=o.prefetch_min_precision,
        micro_batches=1 if previous_step_only else o.micro_batches,
        fetch_programs=0 if previous_step_only else o.fetch_programs,
        fetch_lane=o.fetch_lane,
        control_stream=o.control_stream and not previous_step_only,
        disk_misses=o.disk_misses,
        kv_dtype=o.kv_dtype,
    )
    return TieredSparseKVCache(s.config, s.batch, s.context, device, s.dtype, tiered=cfg)


def remove_disk_files(o: Options) -> None:
    for d in o.disk:
        shutil.rmtree(Path(d) / DISK_SUBDIR, ignore_errors=True)


def _settle(o: Options) -> int:
    return o.rebalance_after + 1 if o.rebalance_after else 0  # caches restart empty after the rebalance


SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        System(
            "full_gpu",
            "all KV on the GPU (ContiguousKVCache, exact attention, CUDA graph)",
            False,
            _contiguous,
            mem.full_cache_kv,
            mem.nothing,
            mem.full_read,
            "none",
        ),
        System(
            "full_gpu_paged",
            "all KV on the GPU in pages (PagedKVCache, the LLM's plain cache: split-KV decode kernel, CUDA graph)",
            False,
            _paged,
            mem.full_cache_kv,
            mem.nothing,
            mem.full_read,
            "none",
        ),
        System(
            "hf_offload",
            "transformers generate, cache_implementation='offloaded' (whole KV to host after each "
            "layer, prefetched back one layer ahead), same weights",
            True,
            None,
            mem.hf_gpu_bytes,
            mem.hf_host_bytes,
            mem.full_read,
            "all_kv",
        ),
        System(
            "streaming",
            "FlexGen-style: all KV in pinned host memory, every layer's whole KV streamed to the GPU "
            "one layer ahead (HostStreamingKVCache)",
            True,
            _streaming,
            mem.layer_buffers,
            mem.full_cache_kv,
            mem.full_read,
            "all_kv",
        ),
        System(
            "sparse_gpu",
            "Quest-style reference: sparse retrieval with every group on the GPU (SparseKVCache)",
            False,
            _sparse_gpu,
            mem.sparse_gpu_bytes,
            mem.nothing,
            mem.sparse_read,
            "none",
        ),
        System(
            "sparse_host",
            "ShadowKV/InfiniGen-style: KV in host memory, selected groups fetched every step, "
            "next layer prefetched, no cross-step GPU cache (TieredSparseKVCache, eviction='none')",
            False,
            _tiered("none"),
            mem.tiered_gpu_bytes,
            mem.stored_kv,
            mem.sparse_read,
            "measured",
            _settle,
            formats=True,
        ),
        System(
            "kvdrive_host",
            "kvdrive: KV in host memory, GPU selection cache with lookahead eviction, next-layer "
            "prefetch (TieredSparseKVCache)",
            False,
            _tiered(None),
            mem.tiered_gpu_bytes,
            mem.stored_kv,
            mem.sparse_read,
            "measured",
            _settle,
            formats=True,
        ),
        System(
            "kvdrive_ssd",
            "kvdrive over host + SSD: as kvdrive_host, every group on the disk pool (--disk) behind "
            "a fixed pinned host arena (--ssd-host-gib)",
            False,
            _tiered_ssd,
            mem.tiered_gpu_bytes,
            mem.ssd_host,
            mem.sparse_read,
            "measured",
            _settle,
            mem.stored_kv,
            formats=True,
        ),
        System(
            "kvswap_ssd",
            "KVSwap-style: as kvdrive_ssd, but the GPU keeps only the previous step's selection "
            "(cache of one selection, LRU, no rebalance)",
            False,
            lambda s, d, o: _tiered_ssd(s, d, o, previous_step_only=True),
            mem.tiered_gpu_bytes,
            mem.ssd_host,
            mem.sparse_read,
            "measured",
            lambda o: 0,
            mem.stored_kv,
            formats=True,
        ),
    )
}


def mem_available() -> int:
    """Host MemAvailable in bytes (0 where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _disk_free(path: str) -> int:
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def skip_reason(system: System, shape: Shape, opts: Options, args, dev, loaded) -> str | None:
    """Why ``system`` cannot run ``shape`` here (None: it can); memory estimates vs what is free."""
    if shape.filled < 1:
        return f"context {shape.context} leaves no room for {shape.decode_room} decode steps"
    if system.needs_cuda and dev.type != "cuda":
        return "needs a CUDA GPU"
    if system.build is None and not loaded.random_weights:
        return "hf_offload shares weights only with random: presets (bench/model.py's hf_model)"
    if system.build is None and shape.batch * shape.context > args.hf_max_tokens:
        return f"context x batch > --hf-max-tokens {args.hf_max_tokens} (its prefill alone would take minutes)"
    gpu, host = system.gpu_bytes(shape, opts), system.host_bytes(shape, opts)
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
        if gpu + args.gpu_headroom_gib * GIB > free:
            return (
                f"needs ~{gpu / GIB:.1f} GiB of GPU memory beyond the weights, {free / GIB:.1f} GiB free "
                f"(headroom {args.gpu_headroom_gib:g} GiB)"
            )
    else:
        host += gpu
    disk = system.disk_bytes(shape, opts)
    if disk:
        room = min(_disk_free(d) for d in opts.disk)
        if disk / len(opts.disk) > min(room - 2 * GIB, opts.disk_gib * GIB):
            return (
                f"needs ~{disk / GIB:.1f} GiB on disk over {len(opts.disk)} path(s), each has "
                f"{min(room / GIB, opts.disk_gib):.1f} GiB (free space, --disk-gib)"
            )
    avail = mem_available()
    if avail and host + args.host_headroom_gib * GIB > avail:
        return (
            f"needs ~{host / GIB:.1f} GiB of host memory, {avail / GIB:.1f} GiB available "
            f"(headroom {args.host_headroom_gib:g} GiB)"
        )
    return None


def hf_decode(loaded, prompts: torch.Tensor, new_tokens: int) -> dict:
    """Decode tokens/s of transformers ``generate`` with its offloaded cache on kvdrive's
    weights: (time of prefill + N+1 tokens - time of prefill + 1 token) / N, as bench model."""
    from kvdrive.bench.model import decode_rate, hf_model

    hf = hf_model(loaded)

    def gen(p, n):
        with torch.inference_mode():
            return hf.generate(
                p,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                cache_implementation="offloaded",
                attention_mask=torch.ones_like(p),
                pad_token_id=0,
            )

    rate = decode_rate(gen, prompts, new_tokens, 1, prompts.device)
    return {
        "tokens_per_s": rate["decode_tokens_per_s"],
        "step_ms": rate["decode_step_ms"],
        "prefill_plus_first_token_s": rate["prefill_plus_first_token_s"],
        "steps_timed": new_tokens,
    }
