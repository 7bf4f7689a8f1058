"""CUDA-graph decode: one captured forward per batch composition.

Eager decode of a large model is bound by Python and kernel-launch overhead (about
1,500 launches per step for a 32-layer model). Capturing the step once and replaying
it removes that. A graph is valid for one fixed list of sequences in one cache; the
caller recaptures when the batch changes (a sequence finishes). Inputs go through
static buffers: token ids (B, 1) and cached lengths (B,); the cache plans against
the length buffer, so masks and write positions are computed on the GPU. Where the cache
allows (``supports_graph_span``), a graph attends to the next power of two above the
longest sequence (at least ``SPAN_MIN``) rather than the whole allocation, and is captured
again when a sequence grows past it: a step costs the keys it has, within 2x.

A cache that takes its sequences' rows from a device tensor (``supports_padded_graphs``: the
paged cache) runs under ``PaddedDecodeGraphs`` instead: one graph per padded batch size
(1, 2, 4, 8, then multiples of 8, as vLLM captures), kept and replayed for any batch that
fits, so a request joining or finishing captures nothing once each size has run.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kvdrive.cache.base import KVCache
from kvdrive.engine.micro_batch import MicroBatchedDecode

SPAN_MIN = 256  # the shortest span a graph attends to: fewer recaptures for short sequences


def capture(forward: Callable[[], torch.Tensor], device, on_capture=None, pool=None):
    """Run ``forward`` twice on a side stream (warm-up outside capture, as CUDA graphs require),
    then capture it into a graph (in memory ``pool`` if given): (the graph, its static output).
    ``on_capture(seconds)`` gets the wall time, warm-up included: a capture stalls the engine."""
    t0 = time.perf_counter()
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            forward()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()
    if on_capture is not None:
        torch.cuda.current_stream(device).synchronize()
        on_capture(time.perf_counter() - t0)
    return graph, out


class PinnedUpload:
    """Host rows (``shape``, int64) to a graph's static device inputs without waiting for the GPU.

    NOTE: the rows go up from pinned buffers, two in turn. From pageable memory the copy blocks
    the host until the GPU has finished the step before, and the next replay's launch (thousands
    of graph nodes) then runs with the GPU idle. A buffer is rewritten only after its last copy
    (issued two steps ago) has run."""

    def __init__(self, shape: tuple[int, ...]):
        self._bufs = [torch.empty(shape, dtype=torch.int64).pin_memory() for _ in range(2)]
        self._uploaded: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def next(self) -> torch.Tensor:
        """The buffer to fill for this step (free once its last copy has run)."""
        i = self._turn
        if self._uploaded[i] is not None:
            self._uploaded[i].synchronize()
        return self._bufs[i]

    def send(self, pairs) -> None:
        """Issue the copies (pinned rows of the buffer from ``next``, device tensor) of this step."""
        for src, dst in pairs:
            dst.copy_(src, non_blocking=True)
        i, self._turn = self._turn, 1 - self._turn
        self._uploaded[i] = torch.cuda.Event()
        self._uploaded[i].record()


class GraphedDecodeStep:
    def __init__(
        self,
        model,
        cache: KVCache,
        seq_ids: list[int],
        token_ids: torch.Tensor,
        micro_batches: int | None = None,
        on_capture: Callable[[float], None] | None = None,
    ):
        """``micro_batches``: parts of the batch run on their own streams inside the graph
        (see ``kvdrive.engine.micro_batch``), for caches that support it; None: the cache's setting.
        ``on_capture(seconds)``: called after each capture (the first, and each one a grown span or
        reallocated buffers make) with its wall time, warm-up included."""
        self.model, self.cache, self.seq_ids = model, cache, tuple(seq_ids)
        self.on_capture = on_capture
        self.step = MicroBatchedDecode(model, cache, micro_batches)
        self.ids = token_ids.clone()  # (B, 1) static input
        self.start = torch.tensor([cache.length(s) for s in seq_ids], device=model.device)  # (B,) static input
        self._lengths = PinnedUpload(tuple(self.start.shape))
        self.span = self._span()
        self._capture()

    def _capture(self) -> None:
        self.epoch = self.cache.graph_epoch  # a cache that reallocates bumps it
        self.graph, self.logits = capture(self._forward, self.model.device, self.on_capture)  # (B, V) static output

    def _forward(self) -> torch.Tensor:
        # The warm-up and the capture write KV at each sequence's next position: the real
        # step overwrites exactly those entries, so nothing committed is disturbed.
        logits, self.batches = self.step.forward(self.seq_ids, self.ids, start=self.start, span=self.span)
        return logits

    def _span(self) -> int | None:
        """Positions this step must attend to: a power of two above every sequence's next position."""
        if not self.cache.supports_graph_span:
            return None
        need = max(self.cache.length(s) for s in self.seq_ids) + 1
        return min(self.cache.max_len, max(SPAN_MIN, 1 << (need - 1).bit_length()))

    def matches(self, seq_ids) -> bool:
        return tuple(seq_ids) == self.seq_ids

    def commit(self) -> None:
        """After a replay: the step's tokens become part of their sequences."""
        for batch in self.batches:
            self.cache.commit(batch)

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Run one decode step; the caller then calls ``commit``."""
        self.cache.prepare_replay(self.seq_ids)  # host-side work of the step, before the replay
        self.ids.copy_(token_ids)
        self._upload_lengths()
        span = self._span()
        if self.cache.graph_epoch != self.epoch or span != self.span:  # buffers reallocated, or a sequence
            self.span = span  # grew past the span: capture again
            self._capture()
        self.graph.replay()
        return self.logits

    def _upload_lengths(self) -> None:
        """The cached lengths into ``start``, without waiting for the GPU (``PinnedUpload``)."""
        buf = self._lengths.next()
        buf.copy_(torch.tensor([self.cache.length(s) for s in self.seq_ids], dtype=buf.dtype))
        self._lengths.send([(buf, self.start)])


class GraphCaptureError(RuntimeError):
    """A padded decode graph could not be captured (the cause is chained)."""


def padded_size(n: int, max_batch: int) -> int:
    """The graph size a batch of ``n`` sequences runs in: 1, 2, 4, 8, then multiples of 8
    (vLLM's capture sizes), at most ``max_batch``."""
    size = 1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8
    return max(n, min(size, max_batch))


class PaddedDecodeGraphs:
    """CUDA-graph decode for a cache with ``supports_padded_graphs`` (the paged cache): one graph
    per padded batch size, captured at its first use and kept, replayed for every batch that
    fits it. The sequences' table rows, lengths and tokens go in through static buffers; the
    padding rows name the cache's ``pad_slot``, whose writes land on a scratch page. A batch
    that changes (a request joins or finishes) replays a kept graph instead of capturing one."""

    def __init__(self, model, cache: KVCache, max_batch: int, on_capture: Callable[[float], None] | None = None):
        self.model, self.cache, self.max_batch = model, cache, max_batch
        self.on_capture = on_capture
        self.graphs: dict[int, _Padded] = {}
        self.epoch = cache.graph_epoch
        self._pool = torch.cuda.graph_pool_handle()  # one replay at a time: the graphs share memory
        self._rows = PinnedUpload((2, max_batch))  # slots, lengths

    def __call__(self, seq_ids, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of one decode step of ``seq_ids`` (token_ids (B, 1) on the device); the
        caller samples them before the next step (the graphs share their memory) and calls
        ``commit``."""
        b = len(seq_ids)
        if self.cache.graph_epoch != self.epoch:  # buffers reallocated: every graph is stale
            self.graphs.clear()
            self.epoch = self.cache.graph_epoch
        size = padded_size(b, self.max_batch)
        g = self.graphs.get(size)
        if g is None:
            try:
                g = self._capture(size)
            except RuntimeError as err:  # e.g. an op the capture cannot record, on this device or build
                raise GraphCaptureError(f"capturing the decode graph of batch size {size} failed: {err}") from err
        self.cache.prepare_replay(seq_ids)  # pages for the step's tokens, written in place
        host = self._rows.next()[:, :size]
        host[0, :b] = torch.tensor([self.cache.slot(s) for s in seq_ids])
        host[1, :b] = torch.tensor([self.cache.length(s) for s in seq_ids])
        host[0, b:], host[1, b:] = self.cache.pad_slot, 0
        self._rows.send([(host[0], g.slots), (host[1], g.start)])
        g.ids[:b].copy_(token_ids)
        g.ids[b:] = 0
        g.graph.replay()
        return g.logits[:b]

    def commit(self, seq_ids) -> None:
        self.cache.commit_decode(seq_ids)

    def _capture(self, size: int) -> _Padded:
        dev = self.model.device
        g = _Padded(
            ids=torch.zeros(size, 1, dtype=torch.int64, device=dev),
            slots=torch.full((size,), self.cache.pad_slot, dtype=torch.int64, device=dev),
            start=torch.zeros(size, dtype=torch.int64, device=dev),
        )  # all padding while capturing: the warm-up and capture write only the scratch page

        def step() -> torch.Tensor:
            return self.model(g.ids, self.cache, self.cache.plan_padded(g.slots, g.start))

        g.graph, g.logits = capture(step, dev, self.on_capture, self._pool)  # logits (size, V)
        self.graphs[size] = g
        return g


class _Padded:
    """One captured padded step: its static inputs, its graph and its static logits."""

    def __init__(self, ids: torch.Tensor, slots: torch.Tensor, start: torch.Tensor):
        self.ids, self.slots, self.start = ids, slots, start
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
