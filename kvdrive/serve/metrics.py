"""Prometheus metrics, named like vLLM's (``vllm:`` -> ``kvdrive:``) so dashboards carry over.

Two sources, one registry per server:

* request latencies, observed on the engine thread as tokens are made (``ServeMetrics`` is
  the ``AsyncEngine``'s observer): time to first token, inter-token latency, end-to-end
  latency, requests finished by reason;
* everything the engine and its caches count, read at scrape time from the engine's last
  ``EngineSnapshot`` (queues, KV bytes per tier, traffic between tiers, the GPU selection
  cache, the prefix pool, reads that failed their checksum or I/O and became misses).

docs/serve.md lists every metric.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvdrive.engine.async_engine import RequestObserver
from kvdrive.engine.core import EngineSnapshot

# vLLM's buckets
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)

# cache stats key -> (counter name, help): monotonic totals the caches keep
CACHE_COUNTERS = {
    "bytes_host_to_gpu": ("kvdrive:kv_bytes_host_to_gpu", "KV bytes copied from host memory to the GPU"),
    "bytes_gpu_to_host": ("kvdrive:kv_bytes_gpu_to_host", "KV bytes of new tokens written to host memory"),
    "bytes_disk_read": ("kvdrive:kv_bytes_disk_read", "KV bytes read from the disk tier"),
    "bytes_disk_written": ("kvdrive:kv_bytes_disk_written", "KV bytes written to the disk tier"),
    "groups_selected": ("kvdrive:gpu_selection_cache_queries", "KV groups selected by decode steps"),
    "deferred": (
        "kvdrive:selections_deferred",
        "selected groups left out of a step because they were only on disk (disk_misses=defer); read for later steps",
    ),
    "lost": (
        "kvdrive:kv_reads_failed",
        "disk reads that failed or failed their checksum: the group became a miss, never served",
    ),
}


class ServeMetrics(RequestObserver):
    """The server's registry; observes requests on the engine thread."""

    def __init__(self, model_name: str, snapshot: Callable[[], EngineSnapshot | None]):
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        self._labels = labels

        def hist(name, doc, buckets):
            return Histogram(name, doc, list(labels), buckets=buckets, registry=self.registry).labels(**labels)

        self.ttft = hist("kvdrive:time_to_first_token_seconds", "Time from arrival to the first token", TTFT_BUCKETS)
        self.itl = hist("kvdrive:inter_token_latency_seconds", "Time between two tokens of a request", ITL_BUCKETS)
        self.e2e = hist("kvdrive:e2e_request_latency_seconds", "Time from arrival to the last token", E2E_BUCKETS)
        self.finished_requests = Counter(
            "kvdrive:request_success",
            "Requests finished, by finish reason",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.registry.register(_SnapshotCollector(labels, snapshot))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends (Linux)
        self._arrival: dict[int, float] = {}
        self._last: dict[int, float] = {}

    def added(self, req, now: float) -> None:
        self._arrival[req.seq_id] = now

    def tokens(self, events, now: float) -> None:
        for e in events:
            if e.token_id < 0 or e.seq_id not in self._arrival:
                continue
            last = self._last.get(e.seq_id)
            if last is None:
                self.ttft.observe(now - self._arrival[e.seq_id])
            else:
                self.itl.observe(now - last)
            self._last[e.seq_id] = now

    def finished(self, req, now: float) -> None:
        arrival = self._arrival.pop(req.seq_id, None)
        self._last.pop(req.seq_id, None)
        if arrival is not None and req.output_ids:
            self.e2e.observe(now - arrival)
        self.finished_requests.labels(**self._labels, finished_reason=req.finish_reason or "abort").inc()


class _SnapshotCollector:
    """Metrics read from the engine's last snapshot at scrape time (none while the model loads)."""

    def __init__(self, labels: dict[str, str], snapshot: Callable[[], EngineSnapshot | None]):
        self.labels, self.snapshot = labels, snapshot

    def describe(self):
        return []  # built at scrape time: nothing to check at registration

    def collect(self):
        snap = self.snapshot()
        if snap is None:
            return
        names, values = list(self.labels), list(self.labels.values())

        def gauge(name, doc, value, **extra):
            g = GaugeMetricFamily(name, doc, labels=names + list(extra))
            g.add_metric(values + list(extra.values()), value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, value)
            return c

        c = snap.counters
        yield gauge(
            "kvdrive:num_requests_running", "Requests admitted (prefilling or decoding)", snap.running + snap.prefilling
        )
        yield gauge("kvdrive:num_requests_waiting", "Requests waiting for a sequence slot", snap.waiting)
        if snap.device_memory is not None:
            yield gauge(
                "kvdrive:gpu_memory_allocated_bytes",
                "Bytes torch holds allocated on the GPU (weights, KV, activations)",
                snap.device_memory,
            )
        if snap.device_reserved is not None:
            yield gauge(
                "kvdrive:gpu_memory_reserved_bytes",
                "Bytes torch's caching allocator holds on the GPU",
                snap.device_reserved,
            )
        yield gauge(
            "kvdrive:kv_cache_usage_perc",
            "Tokens held in the KV cache / tokens it can hold (0..1)",
            snap.kv_tokens / snap.kv_capacity_tokens if snap.kv_capacity_tokens else 0.0,
        )
        yield counter("kvdrive:prompt_tokens", "Prompt tokens of admitted requests", c.prompt_tokens)
        yield counter("kvdrive:generation_tokens", "Tokens generated", c.generation_tokens)
        yield counter(
            "kvdrive:cuda_graph_captures",
            "CUDA-graph captures of the decode step (new batch or grown span)",
            c.graph_captures,
        )
        yield counter(
            "kvdrive:cuda_graph_capture_seconds",
            "Wall time of those captures, warm-up included (the engine decodes nothing meanwhile)",
            c.graph_capture_seconds,
        )
        yield counter("kvdrive:prefix_cache_queries", "Prompt tokens looked up in the prefix pool", c.prefix_queries)
        yield counter("kvdrive:prefix_cache_hits", "Prompt tokens loaded from the prefix pool", c.prefix_hits)
        used = GaugeMetricFamily("kvdrive:kv_cache_used_bytes", "KV bytes held per tier", labels=names + ["tier"])
        cap = GaugeMetricFamily(
            "kvdrive:kv_cache_capacity_bytes", "KV bytes allocated or budgeted per tier", labels=names + ["tier"]
        )
        for tier, b in snap.tiers.items():
            used.add_metric(values + [tier], b.used)
            cap.add_metric(values + [tier], b.capacity)
        yield used
        yield cap
        stats = snap.cache_stats
        for key, (name, doc) in CACHE_COUNTERS.items():
            yield counter(name, doc, stats.get(key) or 0)
        hits = (stats.get("gpu_hits") or 0) + (stats.get("prefetched_hits") or 0)
        yield counter("kvdrive:gpu_selection_cache_hits", "Selected groups found in the GPU selection cache", hits)
        yield gauge(
            "kvdrive:gpu_selection_cache_hit_rate",
            "Selected groups found in the GPU selection cache / groups selected, since start",
            stats.get("hit_rate") or 0.0,
        )
        p = snap.prefix_stats
        if p is not None:
            pused = GaugeMetricFamily(
                "kvdrive:prefix_pool_used_bytes", "Prefix pool bytes in use per tier", labels=names + ["tier"]
            )
            pcap = GaugeMetricFamily(
                "kvdrive:prefix_pool_capacity_bytes", "Prefix pool bytes per tier", labels=names + ["tier"]
            )
            for tier, u, k in (
                ("host", p.host_bytes_used, p.host_capacity),
                ("disk", p.disk_bytes_used, p.disk_capacity),
            ):
                pused.add_metric(values + [tier], u)
                pcap.add_metric(values + [tier], k)
            yield pused
            yield pcap
            yield counter(
                "kvdrive:prefix_pool_bytes_loaded", "Prefix pool bytes loaded into the KV cache", p.loaded_bytes
            )
            yield counter(
                "kvdrive:prefix_pool_chunks_corrupt",
                "Stored chunks that failed their read or checksum: dropped and recomputed, never served",
                p.corrupt_chunks,
            )
            yield counter(
                "kvdrive:prefix_pool_store_skipped",
                "Chunks not stored for a reason the pool lives with (full disk, write error)",
                p.store_skipped,
            )
