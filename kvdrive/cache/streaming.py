"""Full-KV offload to host memory, streamed to the GPU layer by layer (FlexGen-style).

The baseline every sparse system is measured against: all KV lives in pinned host
memory, and each decode step copies every layer's whole KV to the GPU, one layer ahead
of compute on a side stream (double-buffered), then attends exactly. New tokens are
written to the GPU buffer for this step and copied back to host memory.

Step time is bounded below by (KV bytes of the batch) / (host->GPU bandwidth).
"""

from __future__ import annotations

import torch

from kvdrive import device as devices
from kvdrive.cache.base import ForwardBatch, KVCache
from kvdrive.cache.contiguous import attention_mask, chunk_attention, grouped_sdpa, layer_specs
from kvdrive.cache.slots import SequenceSlots
from kvdrive.config import ModelConfig
from kvdrive.errors import KvdriveError


class HostStreamingKVCache(KVCache):
    """Contract as ``KVCache``. ``overlap=False`` copies each layer on the compute stream
    right before its attention (ablation)."""

    def __init__(
        self,
        config: ModelConfig,
        max_seqs: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
        overlap: bool = True,
    ):
        if device.type != "cuda":
            raise KvdriveError("host streaming needs a CUDA device (on CPU every tier is host memory)")
        self.layer_specs = layer_specs(config)
        self.max_seqs, self.max_len, self.device, self.dtype = max_seqs, max_len, device, dtype
        self.n_layers = config.num_hidden_layers
        shape = (max_seqs, config.num_key_value_heads, max_len, config.head_dim)  # (S, H_kv, L, D)
        self.host_k = [devices.host_zeros(shape, dtype, True) for _ in range(self.n_layers)]
        self.host_v = [devices.host_zeros(shape, dtype, True) for _ in range(self.n_layers)]
        self.buf_k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(2)]  # double buffer
        self.buf_v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(2)]
        self.overlap = overlap
        self.copy_stream = devices.new_stream(device)
        self.ready = [devices.new_event(device) for _ in range(2)]  # buffer holds layer's KV
        self.free_ev = [devices.new_event(device) for _ in range(2)]  # compute done with buffer
        self.seqs = SequenceSlots(max_seqs, max_len, "host streaming cache")

    def add(self, seq_id: int, max_tokens: int, prompt_tokens: int | None = None) -> None:
        self.seqs.add(seq_id, max_tokens)

    def free(self, seq_id: int) -> None:
        self.seqs.free(seq_id)

    def length(self, seq_id: int) -> int:
        return self.seqs.length(seq_id)

    def plan(self, seq_ids, num_new: int) -> ForwardBatch:
        seq_ids = tuple(seq_ids)
        starts = self.seqs.starts(seq_ids, num_new)
        slots = [self.seqs.slot(s) for s in seq_ids]
        if slots != list(range(slots[0], slots[0] + len(slots))):
            raise KvdriveError("host streaming cache needs the batch in slot order (a contiguous slot range)")
        start = torch.tensor(starts, device=self.device)
        meta = {
            "slots": slice(slots[0], slots[0] + len(slots)),
            "kv_len": max(starts) + num_new,
            "start": start,
            "masks": {},
            "uniform": len(set(starts)) == 1,
        }
        batch = ForwardBatch(seq_ids, starts, num_new, start[:, None] + torch.arange(num_new, device=self.device), meta)
        if self.overlap:
            # Host rows written back by the last step's D2H copies must land before we read them.
            self.copy_stream.wait_stream(devices.current_stream(self.device))
            self._prefetch(0, batch)
        return batch

    def _prefetch(self, layer: int, batch: ForwardBatch) -> None:
        """Copy ``layer``'s cached prefix into buffer ``layer % 2`` on the copy stream."""
        m, b = batch.meta, layer % 2
        n = max(batch.start)  # tokens already on the host; new ones arrive through append
        stream = self.copy_stream if self.overlap else devices.current_stream(self.device)
        stream.wait_event(self.free_ev[b])
        # NOTE: torch copies a strided (B, H, :n, D) slice from pinned memory at a fraction of
        # the link's bandwidth; whole rows of the slot range are one contiguous DMA at full
        # bandwidth, so copy them when they are not much more than what is needed.
        span = self.max_len if 2 * n >= self.max_len else n
        with devices.use_stream(stream):
            self.buf_k[b][m["slots"], :, :span].copy_(self.host_k[layer][m["slots"], :, :span], non_blocking=True)
            self.buf_v[b][m["slots"], :, :span].copy_(self.host_v[layer][m["slots"], :, :span], non_blocking=True)
            self.ready[b].record(stream)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> None:
        m, b = batch.meta, layer % 2
        if not self.overlap:
            self._prefetch(layer, batch)
        devices.current_stream(self.device).wait_event(self.ready[b])
        if layer + 1 < self.n_layers and self.overlap:
            self._prefetch(layer + 1, batch)  # overlaps with this layer's attention and MLP
        pos = batch.positions  # (B, T)
        rows = torch.arange(m["slots"].start, m["slots"].stop, device=self.device)[:, None].expand_as(pos)
        self.buf_k[b][rows, :, pos] = k.transpose(1, 2)
        self.buf_v[b][rows, :, pos] = v.transpose(1, 2)
        # Write-back of the new tokens (tiny) to host memory.
        s0 = batch.start[0]
        if m["uniform"]:
            self.host_k[layer][m["slots"], :, s0 : s0 + batch.num_new].copy_(k, non_blocking=True)
            self.host_v[layer][m["slots"], :, s0 : s0 + batch.num_new].copy_(v, non_blocking=True)
        else:
            for i, s in enumerate(batch.start):
                row = m["slots"].start + i
                self.host_k[layer][row, :, s : s + batch.num_new].copy_(k[i], non_blocking=True)
                self.host_v[layer][row, :, s : s + batch.num_new].copy_(v[i], non_blocking=True)

    def attend(self, layer: int, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        m, b, spec = batch.meta, layer % 2, self.layer_specs[layer]
        k = self.buf_k[b][m["slots"], :, : m["kv_len"]]
        v = self.buf_v[b][m["slots"], :, : m["kv_len"]]
        if m["uniform"]:  # one shared start: causal without a mask
            out = chunk_attention(q, k, v, batch.start[0], spec)
        else:
            if spec.window not in m["masks"]:
                m["masks"][spec.window] = attention_mask(m["start"], batch.num_new, m["kv_len"], spec.window)
            out = grouped_sdpa(q, k, v, m["masks"][spec.window], spec.scale, spec.softcap)
        self.free_ev[b].record(devices.current_stream(self.device))
        return out

    def commit(self, batch: ForwardBatch) -> None:
        self.seqs.commit(batch.seq_ids, batch.num_new)
