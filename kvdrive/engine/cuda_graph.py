"""CUDA-graph decode: one captured forward per batch composition.

Eager decode of a large model is bound by Python and kernel-launch overhead (about
1,500 launches per step for a 32-layer model). Capturing the step once and replaying
it removes that. A graph is valid for one fixed list of sequences in one cache; the
caller recaptures when the batch changes (a sequence finishes). Inputs go through
static buffers: token ids (B, 1) and cached lengths (B,); the cache plans against
the length buffer, so masks and write positions are computed on the GPU.
"""

from __future__ import annotations

import torch

from kvdrive.cache.base import KVCache
from kvdrive.engine.micro_batch import MicroBatchedDecode


class GraphedDecodeStep:
    def __init__(
        self, model, cache: KVCache, seq_ids: list[int], token_ids: torch.Tensor, micro_batches: int | None = None
    ):
        """``micro_batches``: parts of the batch run on their own streams inside the graph
        (see ``kvdrive.engine.micro_batch``), for caches that support it; None: the cache's setting."""
        self.model, self.cache, self.seq_ids = model, cache, tuple(seq_ids)
        self.step = MicroBatchedDecode(model, cache, micro_batches)
        self.ids = token_ids.clone()  # (B, 1) static input
        self.start = torch.tensor([cache.length(s) for s in seq_ids], device=model.device)  # (B,) static input
        # NOTE: the lengths go up from pinned buffers, two in turn. From pageable memory the copy
        # blocks the host until the GPU has finished the step before, and the next replay's
        # launch (thousands of graph nodes) then runs with the GPU idle.
        self._lengths = [torch.empty_like(self.start, device="cpu").pin_memory() for _ in range(2)]
        self._uploaded: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self._capture()

    def _capture(self) -> None:
        dev = self.model.device
        self.epoch = self.cache.graph_epoch  # a cache that reallocates bumps it
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up outside capture, as CUDA graphs require
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()  # (B, V) static output

    def _forward(self) -> torch.Tensor:
        # The warm-up and the capture write KV at each sequence's next position: the real
        # step overwrites exactly those entries, so nothing committed is disturbed.
        logits, self.batches = self.step.forward(self.seq_ids, self.ids, start=self.start)
        return logits

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
        if self.cache.graph_epoch != self.epoch:  # buffers reallocated: capture again
            self._capture()
        self.graph.replay()
        return self.logits

    def _upload_lengths(self) -> None:
        """The cached lengths into ``start``, without waiting for the GPU: a buffer is rewritten
        only after its last copy (issued two steps ago) has run."""
        i, self._turn = self._turn, 1 - self._turn
        if self._uploaded[i] is not None:
            self._uploaded[i].synchronize()
        buf = self._lengths[i]
        buf.copy_(torch.tensor([self.cache.length(s) for s in self.seq_ids], dtype=buf.dtype))
        self.start.copy_(buf, non_blocking=True)
        self._uploaded[i] = torch.cuda.Event()
        self._uploaded[i].record()
