"""Micro-batched decode: a batch split into parts that run on their own CUDA streams.

A tiered decode step is a chain per sequence: a layer's query selects its groups, the
misses cross PCIe, then attention and the MLP run, then the next layer's query. Within
one sequence the fetch cannot start before its query exists, so a single batch leaves
the GPU idle while it waits on PCIe and leaves PCIe idle while it computes. Sequences
are independent, though: with the batch in parts on separate streams, one part's
fetch overlaps another part's compute (KVDrive's micro-batch pipeline). The price is
that every part reads the weights once per step.

Two things make the overlap happen (docs/bench.md has the ablations):

* the parts' layers are issued interleaved (part 0's layer l, part 1's layer l, part 0's
  layer l+1, ...; ``DecoderLM.layer_steps``), and a cache with a fetch lane
  (``TieredSparseKVCache``) runs every part's fetch in that order on one stream: the parts
  take turns on PCIe instead of sharing it. Without the lane, two parts fetching at once
  each got half the bandwidth, finished together and then computed together: they fell
  into lockstep and nothing overlapped;
* the part streams have high priority, the lane default: a part's compute kernels get
  SMs ahead of the blocks of the copy running beside them.

``parts == 1`` is the plain step (the ablation switch). On CPU the parts run one after
the other: same results, no overlap. A cache takes part in this only if it says so
(``supports_micro_batches``): its per-step state must be per sequence, its counters
must be updated atomically, and its ``plan`` takes ``new_step=False`` for the parts
after the first (one decode step, counted once).
"""

from __future__ import annotations

import torch

from kvdrive import device as devices
from kvdrive.cache.base import ForwardBatch, KVCache


def part_slices(n: int, parts: int) -> list[slice]:
    """``n`` sequences in ``min(parts, n)`` contiguous parts of near-equal size."""
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


class MicroBatchedDecode:
    """Runs one decode forward of ``seq_ids`` in ``parts`` micro-batches (inside a CUDA graph
    capture too: the part streams fork from and join the current stream)."""

    def __init__(self, model, cache: KVCache, parts: int | None = None):
        """``parts``: None takes the cache's own setting (``micro_batches``, e.g. TieredConfig's)."""
        self.model, self.cache = model, cache
        parts = cache.micro_batches if parts is None else parts
        self.parts = max(1, parts) if cache.supports_micro_batches else 1
        dev = model.device
        self.streams = (
            [devices.new_stream(dev, high_priority=True) for _ in range(self.parts)] if self.parts > 1 else []
        )

    def forward(
        self, seq_ids, token_ids: torch.Tensor, start: torch.Tensor | None = None, span: int | None = None
    ) -> tuple[torch.Tensor, list[ForwardBatch]]:
        """token_ids (B, 1) -> (logits (B, V), the batches to commit). ``start``: the static (B,)
        lengths of a graphed step, ``span`` the positions it attends to (see ``KVCache.plan``)."""
        seq_ids = tuple(seq_ids)
        slices = part_slices(len(seq_ids), self.parts)
        if span is not None and len(slices) != 1:
            raise ValueError("a span is planned for one part only (caches with supports_graph_span)")
        if len(slices) == 1:
            if span is not None:
                batch = self.cache.plan(seq_ids, 1, start=start, span=span)
            else:
                batch = self.cache.plan(seq_ids, 1, start=start) if start is not None else self.cache.plan(seq_ids, 1)
            return self.model(token_ids, self.cache, batch), [batch]
        batches = [
            self.cache.plan(seq_ids[s], 1, start=None if start is None else start[s], new_step=i == 0)
            for i, s in enumerate(slices)
        ]
        main = devices.current_stream(self.model.device)
        capturing = self.model.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        for stream in self.streams[: len(slices)]:
            stream.wait_stream(main)
        runs = [self.model.layer_steps(token_ids[s], self.cache, b) for s, b in zip(slices, batches)]
        outs = [None] * len(slices)
        while any(o is None for o in outs):  # one layer of each part in turn
            for i, (run, stream) in enumerate(zip(runs, self.streams)):
                if outs[i] is None:
                    with devices.use_stream(stream):
                        outs[i] = next(run)
        if self.model.device.type == "cuda" and not capturing:
            for out in outs:
                out.record_stream(main)  # made on the part's stream, read on the main one
        for stream in self.streams[: len(slices)]:
            main.wait_stream(stream)
        return torch.cat(outs), batches
