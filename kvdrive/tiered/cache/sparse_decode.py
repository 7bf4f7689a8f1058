"""``SparseDecode``: how a sparse layer's decode runs across streams: its prefetch (``hint``)
and its attention over the layer's selection cache.

* ``prefetch``: layer l+1's predicted query, issued while layer l runs, selects and fetches
  on a side stream (``TieredConfig.overlap``), then records an event in the step's
  ``meta["prefetch"]``;
* ``attend``: wait for that event, select and fetch what the prediction missed (on a
  highest-priority control stream when micro-batched with ``control_stream``, ahead of the
  other part's GEMMs), then sparse attention over the cache's pages, one selection shared
  by the layer's KV heads.

Owns each compute stream's companions (one per micro-batch stream; on the CPU one
stand-in), made once: the side stream and the control stream. None: the work stays on the
compute stream. Ordering: the side stream waits for the compute stream and the attention
for the side's event; the control stream is joined both ways around the selection.
"""

from __future__ import annotations

import contextlib

import torch

from kvdrive import device as devices
from kvdrive.cache.base import ForwardBatch, LayerSpec
from kvdrive.retrieval.sparse_attention import sparse_attention
from kvdrive.tiered.cache.select_fetch import SelectFetch
from kvdrive.tiered.config import TieredConfig
from kvdrive.tiered.selection_cache import SelectionCache
from kvdrive.tiered.step_profile import no_mark


class SparseDecode:
    def __init__(self, select_fetch: SelectFetch, tiered: TieredConfig, kv_heads: int, device):
        self.select_fetch, self.tiered, self.kv_heads, self.device = select_fetch, tiered, kv_heads, device
        self._sides: dict = {}  # compute stream -> its prefetch stream
        self._controls: dict = {}  # compute stream -> its control stream

    def prefetch(
        self,
        cache: SelectionCache,
        layer: int,
        q_pred: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        step_t: torch.Tensor,
    ) -> None:
        """Select and fetch the groups predicted query ``q_pred`` (B, H_q, D) picks, on the side
        stream; ``attend`` waits for them."""
        compute = devices.current_stream(self.device)
        side = self._side(compute)
        if side is not None:
            side.wait_stream(compute)
            if self.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
                q_pred.record_stream(side)
        with devices.use_stream(side) if side is not None else contextlib.nullcontext():
            self.select_fetch(cache, layer, q_pred, batch, scale, step_t, prefetch=True)
            event = devices.new_event(self.device)
            event.record()
        batch.meta["prefetch"][layer] = event

    def attend(
        self,
        cache: SelectionCache,
        layer: int,
        q: torch.Tensor,
        batch: ForwardBatch,
        spec: LayerSpec,
        step_t: torch.Tensor,
        mark=no_mark,
    ) -> torch.Tensor:
        """One decode query per sequence, q (B, H_q, 1, D), over ``layer``'s selection -> (B, H_q, 1, D)."""
        mark("compute")
        event = batch.meta["prefetch"].pop(layer, None)
        if event is not None:
            event.wait(devices.current_stream(self.device))
        mark("prefetch_wait")
        qd = q[:, :, 0]  # (B, H_q, D)
        compute = devices.current_stream(self.device)
        control = self._control(compute)
        if control is None:
            pages, num_pages = self.select_fetch(cache, layer, qd, batch, spec.scale, step_t, False, mark)
        else:  # what decides the fetch, ahead of the other part's GEMMs; ordered both ways (no record_stream)
            control.wait_stream(compute)
            with devices.use_stream(control):
                pages, num_pages = self.select_fetch(cache, layer, qd, batch, spec.scale, step_t, False, mark)
            compute.wait_stream(control)
        pages = pages[:, None, :].expand(-1, self.kv_heads, -1)  # (B, H_kv, P): one selection per layer
        out, _ = sparse_attention(qd, cache.pool, pages, num_pages, batch.meta["last_len"], spec.scale, spec.softcap)
        mark("attention")
        return out[:, :, None, :]

    def _side(self, compute):
        """The prefetch stream of this compute stream (None: prefetch on the compute stream)."""
        return self._companion(self._sides, compute) if self.tiered.overlap else None

    def _control(self, compute):
        """The highest-priority stream of this compute stream (None: the selection runs on it)."""
        if not (self.tiered.control_stream and self.tiered.micro_batches > 1 and self.device.type == "cuda"):
            return None
        return self._companion(self._controls, compute, highest=True)

    def _companion(self, streams: dict, compute, **kind):
        """``streams``' stream for this compute stream, made once."""
        key = getattr(compute, "cuda_stream", 0)  # CPU: one stand-in
        if key not in streams:
            streams[key] = devices.new_stream(self.device, **kind)
        return streams[key]
