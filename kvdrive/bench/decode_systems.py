"""The systems ``kvdrive bench decode`` compares: name -> how to build its cache, what it
needs in GPU and host memory, and what one decode step must move (the roofline's inputs).

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

from kvdrive.cache.base import KVCache
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


def _no_disk(s: Shape, o: Options) -> int:
    return 0


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
    disk_bytes: Callable[[Shape, Options], int] = _no_disk  # written to the disk pool
    formats: bool = False  # a tiered system: runs once per --kv-dtype (its host and disk tiers' format)

    @property
    def on_disk(self) -> bool:
        """The system keeps KV on the disk pool (its roofline has a disk term)."""
        return self.disk_bytes is not _no_disk


def budget_tokens(sparse: SparseConfig, context: int) -> int:
    return int(sparse.budget if sparse.budget >= 1 else sparse.budget * context)


def _summary_bytes(s: Shape, o: Options, tokens: int) -> int:
    """The summaries of ``tokens`` tokens of every sequence on every global layer, as scored."""
    from kvdrive.retrieval.summaries import make_summarizer

    c = s.config
    summ = make_summarizer(o.sparse.summary, c.num_key_value_heads, c.head_dim, o.sparse.group_tokens)
    return s.batch * -(-tokens // o.sparse.group_tokens) * len(c.global_layers) * summ.bytes_per_group(s.dtype)


def _sparse_read(s: Shape, o: Options) -> int:
    """Budget tokens on global layers, the window on sliding layers, plus every summary scored."""
    per_layer = s.config.kv_bytes_per_token_per_layer(s.dtype)
    seen = sum(min(s.context, budget_tokens(o.sparse, s.context) if w is None else w) for w in s.config.sliding_windows)
    return s.batch * per_layer * seen + _summary_bytes(s, o, s.context)


def _full_read(s: Shape, o: Options) -> int:
    return s.all_kv


def _layer_buffers(s: Shape, o: Options) -> int:
    return 2 * s.batch * s.context * s.config.kv_bytes_per_token_per_layer(s.dtype)  # double-buffered K and V


def _all_kv_max(s: Shape, o: Options) -> int:
    return s.batch * s.context * s.kv_token


def _host_kv(s: Shape, o: Options) -> int:
    """The whole KV in pinned host memory, K and V of each layer apart (HostStreamingKVCache), each
    allocation registered at its exact size (``device.host_zeros``)."""
    return _all_kv_max(s, o)


def stored_share(s: Shape, o: Options) -> float:
    """Bytes of a group in the tiered systems' storage format over its bytes in the model dtype."""
    from kvdrive.storage.layout import GroupLayout

    layout = GroupLayout.from_config(s.config, s.dtype, o.sparse.group_tokens, o.kv_dtype)
    return layout.stored_bytes / layout.group_bytes


def _host_groups(s: Shape, o: Options) -> int:
    """The whole KV in pinned host memory, in the storage format (TieredSparseKVCache)."""
    return int(_all_kv_max(s, o) * stored_share(s, o))


def _none(s: Shape, o: Options) -> int:
    return 0


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


def _sparse_gpu_bytes(s: Shape, o: Options) -> int:
    # The pool holds every group; the first step summarizes the whole prompt of one layer at once.
    one_layer_keys = s.batch * s.context * s.config.kv_bytes_per_token_per_layer(s.dtype) // 2
    return _all_kv_max(s, o) + _summary_bytes(s, o, s.context) + one_layer_keys


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

    budget = min(int(o.disk_gib * GIB), int(_disk_kv(s, o) / len(o.disk) * 1.25) + GIB)
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


def _disk_kv(s: Shape, o: Options) -> int:
    return int(_all_kv_max(s, o) * stored_share(s, o))  # every full group is written behind to disk


def _ssd_host(s: Shape, o: Options) -> int:
    return int(o.ssd_host_gib * GIB)  # the arena, registered at its exact size


def _tiered_gpu_bytes(s: Shape, o: Options) -> int:
    sp = o.sparse
    cache = 0 if o.cache_tokens == "auto" else o.cache_tokens  # auto: the minimum; it grows into what is free
    resident = cache + sp.sink_tokens + sp.window_tokens + budget_tokens(sp, s.context)
    return s.batch * resident * s.kv_token + _summary_bytes(s, o, s.context)


def _settle(o: Options) -> int:
    return o.rebalance_after + 1 if o.rebalance_after else 0  # caches restart empty after the rebalance


def _hf_gpu_bytes(s: Shape, o: Options) -> int:
    # Prefill activations of the batch (hidden states, q/k/v, the MLP's three intermediates)
    # and two layers of KV (one computing, one prefetched).
    c = s.config
    per_token = (6 * c.hidden_size + 3 * c.intermediate_size) * s.dtype.itemsize
    return s.batch * s.context * per_token + 2 * s.batch * s.context * c.kv_bytes_per_token_per_layer(s.dtype)


def _hf_host_bytes(s: Shape, o: Options) -> int:
    return 2 * _all_kv_max(s, o)  # each step writes a layer's grown KV back before the old copy is freed


SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        System(
            "full_gpu",
            "all KV on the GPU (ContiguousKVCache, exact attention, CUDA graph)",
            False,
            _contiguous,
            _all_kv_max,
            _none,
            _full_read,
            "none",
        ),
        System(
            "full_gpu_paged",
            "all KV on the GPU in pages (PagedKVCache, the LLM's plain cache: split-KV decode kernel, CUDA graph)",
            False,
            _paged,
            _all_kv_max,
            _none,
            _full_read,
            "none",
        ),
        System(
            "hf_offload",
            "transformers generate, cache_implementation='offloaded' (whole KV to host after each "
            "layer, prefetched back one layer ahead), same weights",
            True,
            None,
            _hf_gpu_bytes,
            _hf_host_bytes,
            _full_read,
            "all_kv",
        ),
        System(
            "streaming",
            "FlexGen-style: all KV in pinned host memory, every layer's whole KV streamed to the GPU "
            "one layer ahead (HostStreamingKVCache)",
            True,
            _streaming,
            _layer_buffers,
            _host_kv,
            _full_read,
            "all_kv",
        ),
        System(
            "sparse_gpu",
            "Quest-style reference: sparse retrieval with every group on the GPU (SparseKVCache)",
            False,
            _sparse_gpu,
            _sparse_gpu_bytes,
            _none,
            _sparse_read,
            "none",
        ),
        System(
            "sparse_host",
            "ShadowKV/InfiniGen-style: KV in host memory, selected groups fetched every step, "
            "next layer prefetched, no cross-step GPU cache (TieredSparseKVCache, eviction='none')",
            False,
            _tiered("none"),
            _tiered_gpu_bytes,
            _host_groups,
            _sparse_read,
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
            _tiered_gpu_bytes,
            _host_groups,
            _sparse_read,
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
            _tiered_gpu_bytes,
            _ssd_host,
            _sparse_read,
            "measured",
            _settle,
            _disk_kv,
            formats=True,
        ),
        System(
            "kvswap_ssd",
            "KVSwap-style: as kvdrive_ssd, but the GPU keeps only the previous step's selection "
            "(cache of one selection, LRU, no rebalance)",
            False,
            lambda s, d, o: _tiered_ssd(s, d, o, previous_step_only=True),
            _tiered_gpu_bytes,
            _ssd_host,
            _sparse_read,
            "measured",
            lambda o: 0,
            _disk_kv,
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
