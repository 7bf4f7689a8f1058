"""``TieredConfig``: what the tiered cache keeps where and how it moves it (validated)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kvdrive.cache.sparse import SparseConfig
from kvdrive.errors import KvdriveError
from kvdrive.quant.formats import check_kv_dtype
from kvdrive.storage.pool import PoolPath
from kvdrive.tiered.selection_cache import EVICTIONS

AUTO_GPU_SHARE = 0.8  # cache_tokens="auto": share of the free GPU memory (after headroom) the cache may take
DISK_MISSES = ("wait", "defer")  # TieredConfig.disk_misses
AUTO_CPU_TOKENS = 4096  # cache_tokens="auto" off CUDA (the "GPU" cache is then host memory like the tier)


@dataclass(frozen=True)
class TieredConfig:
    """``cache_tokens``: GPU selection-cache size per sequence and layer, averaged over the
    sparse layers (each layer gets at least the pages one selection takes); ``"auto"``
    sizes it when the cache is built: on CUDA, ``AUTO_GPU_SHARE`` of the GPU memory then
    free, split over the sequences (``admission.resolve_cache_tokens``); elsewhere
    ``AUTO_CPU_TOKENS``. A larger cache decodes faster while it fits (docs/tiered.md)."""

    sparse: SparseConfig = field(default_factory=lambda: SparseConfig(sink_tokens=64, window_tokens=256))
    cache_tokens: int | str = "auto"
    eviction: str = "lookahead"  # lookahead | lru | none (no cross-step reuse)
    prefetch: bool = True  # predict and fetch layer l+1's groups while layer l computes
    overlap: bool = True  # prefetch on a side stream (False: on the compute stream, ablation)
    rebalance_after: int = 16  # decode steps before capacities follow measured misses; 0: never
    # Initial placement by importance: once a prompt is prefilled (``place``), the groups its last
    # query selects are loaded into each layer's GPU cache (and, with a disk tier, read into the
    # host arena as most recently used), so the first decode step starts warm.
    warm_start: bool = True
    # At the rebalance, a layer keeps prefetching only if this share of what its prefetch
    # fetched was then selected (a wrong prediction costs the bandwidth of its fetch, and every
    # prefetching layer scores and selects twice per step); 0: always. NOTE: 0.9, not 0.5: layers
    # prefetching at a mediocre precision cost more throughput than they save (docs/bench.md).
    prefetch_min_precision: float = 0.9
    disk: tuple[PoolPath, ...] = ()  # disk pool paths: host memory becomes an arena in front of them
    host_bytes: int = 0  # with disk: pinned host arena, all layers together
    direct: str = "auto"  # O_DIRECT for the disk pool: auto | on | off
    # Decode batch parts on their own streams, interleaved layer by layer, fetching in turn on
    # one lane (``fetch_lane``), so one part's fetch overlaps another's compute; 1: off.
    # "auto": 2 on CUDA, 1 elsewhere (on a CPU the parts run one after the other: nothing to
    # overlap, and each part reads the weights again).
    micro_batches: int | str = "auto"
    # Programs of the host -> GPU fetch kernel. 0: one per (group, block), as many SMs as it
    # gets; N: N looping programs, so the copy leaves the other SMs to a micro-batch's compute;
    # "auto": a quarter of the GPU's SMs with micro-batches (see ``resolve_parts``), else 0.
    fetch_programs: int | str = "auto"
    # With micro-batches: every part's fetch on one stream, in issue order, so the parts take
    # turns on PCIe and one computes while the other fetches (False: ablation, each part
    # fetches on its own stream, and they share PCIe).
    fetch_lane: bool = True
    # With micro-batches: each part's score, selection and cache update (the kernels that decide
    # its next fetch) on a stream of the highest priority, so their blocks start before the other
    # part's GEMM blocks (inside the decode the selection's launches wait for SMs). Off by
    # default until measured (``--control-stream`` in ``kvdrive bench decode``).
    control_stream: bool = False
    # With disk: what a decode step does with selected groups that are only on disk. "wait": read
    # them before the layer's fetch (exact; one host sync per layer and micro-batch). "defer":
    # attend without them this step and read them for later steps (no host sync in the step, so
    # it can be a CUDA graph; the step's attention misses those groups). NOTE: on a disk with
    # millisecond reads "wait" is bound by one read round trip per layer (docs/tiered.md).
    disk_misses: str = "wait"
    # A prompt's KV of every layer stays on the GPU while it is prefilled (where the GPU has room
    # for it then), so a chunk attends to its prefix without gathering it from host; False: each
    # chunk gathers its whole prefix from host, ~T^2 / (2 x chunk) tokens of KV per prompt (ablation).
    stage_prefill: bool = True
    # Tokens of the largest prefill forward (the engine's chunk, ``LLM(prefill_chunk=...)``): the
    # GPU room its activations take is left free when cache_tokens="auto" sizes the cache and when
    # a prompt's stage is decided.
    prefill_tokens: int = 2048
    # Storage format of the host and disk tiers (docs/compression.md): "bf16" keeps the model dtype;
    # "fp8" / "int8" / "int4" store every full group quantized (on the device, once, as it is sealed) and
    # widen it to the model dtype on the device as it is fetched; the open group stays exact.
    kv_dtype: str = "bf16"

    def for_model(self, config) -> TieredConfig:
        """This config with the sparse budget resolved for ``config``'s model (``SparseConfig.for_model``)."""
        sparse = self.sparse.for_model(config)
        return self if sparse is self.sparse else replace(self, sparse=sparse)

    def __post_init__(self):
        check_kv_dtype(self.kv_dtype)
        if self.sparse.kv_dtype not in ("bf16", self.kv_dtype):
            raise KvdriveError(
                f"sparse.kv_dtype={self.sparse.kv_dtype!r} simulates a storage format on a GPU-resident cache; "
                "the tiered cache stores it: set TieredConfig.kv_dtype"
            )
        if self.kv_dtype != "bf16" and self.sparse.summary == "lowrank_seq":
            raise KvdriveError(
                "lowrank_seq fits its basis on the prompt's keys when decoding starts, and a compressed "
                f"tier (kv_dtype={self.kv_dtype!r}) keeps them only quantized: use another summary or kv_dtype='bf16'"
            )
        if not isinstance(self.prefill_tokens, int) or isinstance(self.prefill_tokens, bool) or self.prefill_tokens < 1:
            raise KvdriveError(f"prefill_tokens must be a token count >= 1, got {self.prefill_tokens!r}")
        if self.disk and self.host_bytes <= 0:
            raise KvdriveError("with disk paths, set host_bytes (the pinned host arena in front of the disks)")
        if self.eviction not in EVICTIONS:
            raise KvdriveError(f"eviction must be one of {', '.join(EVICTIONS)}, got {self.eviction!r}")
        if self.sparse.mode != "shared":
            raise KvdriveError("the tiered cache selects whole groups shared by a layer's heads: use mode='shared'")
        if self.micro_batches != "auto" and (not isinstance(self.micro_batches, int) or self.micro_batches < 1):
            raise KvdriveError(
                f"micro_batches must be a part count >= 1 (1: no micro-batching) or 'auto', got {self.micro_batches!r}"
            )
        if self.cache_tokens != "auto" and (not isinstance(self.cache_tokens, int) or self.cache_tokens < 0):
            raise KvdriveError(f"cache_tokens must be a token count >= 0 or 'auto', got {self.cache_tokens!r}")
        if self.fetch_programs != "auto" and (not isinstance(self.fetch_programs, int) or self.fetch_programs < 0):
            raise KvdriveError(f"fetch_programs must be a program count >= 0 or 'auto', got {self.fetch_programs!r}")
        if self.disk_misses not in DISK_MISSES:
            raise KvdriveError(f"disk_misses must be one of {', '.join(DISK_MISSES)}, got {self.disk_misses!r}")
        if self.rebalance_after < 0:
            raise KvdriveError("rebalance_after must be >= 0")
        if not 0 <= self.prefetch_min_precision <= 1:
            raise KvdriveError(
                f"prefetch_min_precision is a share of fetched groups, 0..1, got {self.prefetch_min_precision}"
            )


def resolve_parts(tiered: TieredConfig, device) -> TieredConfig:
    """``tiered`` with ``micro_batches`` and ``fetch_programs`` as numbers. "auto": 2 parts on a
    CUDA device, else 1; the fetch kernel on a quarter of the SMs of a CUDA device when the
    batch is micro-batched, else 0 (one program per tile). A quarter: enough programs to fill
    PCIe, the rest of the SMs left to the other part's GEMMs (half was slower, an eighth starved
    PCIe: docs/bench.md)."""
    import torch

    cuda = getattr(device, "type", "cpu") == "cuda" and torch.cuda.is_available()
    parts = (2 if cuda else 1) if tiered.micro_batches == "auto" else tiered.micro_batches
    programs = tiered.fetch_programs
    if programs == "auto":
        programs = (
            max(1, torch.cuda.get_device_properties(device).multi_processor_count // 4) if cuda and parts > 1 else 0
        )
    return replace(tiered, micro_batches=parts, fetch_programs=programs)
