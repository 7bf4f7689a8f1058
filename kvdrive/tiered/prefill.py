"""``TieredPrefill``: the prefill side of a ``TieredSparseKVCache``, and its exact attention.

* ``write``: a prefill chunk's whole groups go to the host tier as rows (one DMA per
  sequence for a host-only tier) and are summarized from their GPU copy at once; only the
  partial groups at the chunk's ends are written token by token;
* ``attend``: exact attention over a layer's KV gathered from host for the span the query
  sees, one layer's KV on the GPU at a time (prefill, and the decode of dense layers);
* ``remember`` / ``queries``: each prompt's last query per sparse layer, kept for the
  initial placement (``TieredSparseKVCache.place``).

Owns the prompts' last queries and the count of bytes its gathers moved. The host tier, the
layer specs and the group geometry are the cache's, passed in; summaries go through the
cache's ``summarize(layer, slot, first, groups)`` (the cache owns the summary tables).
"""

from __future__ import annotations

import torch

from kvdrive.cache.base import ForwardBatch, LayerSpec
from kvdrive.cache.contiguous import grouped_sdpa
from kvdrive.cache.sparse import span_mask
from kvdrive.storage.layout import GroupLayout
from kvdrive.tiered import tier_ops


class TieredPrefill:
    def __init__(self, host, layout: GroupLayout, layer_specs: tuple[LayerSpec, ...], summarize, device):
        self.host, self.layer_specs, self.summarize, self.device = host, layer_specs, summarize, device
        self.g, self.group_shape, self.group_bytes = layout.group_tokens, layout.slot_shape, layout.group_bytes
        self.dtype = layout.dtype
        self._last_q: dict[int, dict[int, torch.Tensor]] = {}  # slot -> layer -> the prompt's last query (H_q, D)
        self.dense_bytes = 0  # host -> GPU bytes gathered by ``attend``

    # -- the prompts' last queries ------------------------------------------------------
    def remember(self, layer: int, q: torch.Tensor, slot_list) -> None:
        """The last query (B, H_q, T, D) of a prefill chunk, per sequence: the latest chunk's wins."""
        for i, slot in enumerate(slot_list):
            self._last_q.setdefault(slot, {})[layer] = q[i, :, -1].clone()  # (H_q, D)

    def queries(self, slot_list, layer: int) -> torch.Tensor:
        """(B, H_q, D): the remembered last query of ``layer`` of each of ``slot_list``."""
        return torch.stack([self._last_q[s][layer] for s in slot_list])

    def has_queries(self, slot_list) -> bool:
        return all(s in self._last_q for s in slot_list)

    def forget(self, slot_list) -> None:
        for s in slot_list:
            self._last_q.pop(s, None)

    # -- write path ---------------------------------------------------------------------
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, rows: torch.Tensor) -> None:
        """A prefill chunk's k, v (B, H_kv, T, D) of ``layer``: the groups it fills whole go to the
        host tier as whole rows and are summarized right away; only the partial groups at its
        ends are written token by token (``rows`` (B, T): each token's host row)."""
        g, t = self.g, batch.num_new
        typed, offs = self.host.typed(layer), batch.meta["offs"]
        for b, (slot, start) in enumerate(zip(batch.meta["slot_list"], batch.start)):
            first = -(-start // g)  # first group that starts inside the chunk
            n = (start + t) // g - first  # groups the chunk covers whole
            if n <= 0:
                tier_ops.write_tokens(typed, rows[b : b + 1], offs[b : b + 1], k[b : b + 1], v[b : b + 1])
                continue
            lo, hi = first * g - start, (first + n) * g - start  # token span of the whole groups
            for a, z in ((0, lo), (hi, t)):
                if z > a:
                    tier_ops.write_tokens(typed, rows[b : b + 1, a:z], offs[b : b + 1, a:z], k[b : b + 1, :, a:z],
                                          v[b : b + 1, :, a:z])
            h, d = k.shape[1], k.shape[3]
            kv = torch.stack((k[b, :, lo:hi], v[b, :, lo:hi]))  # (2, H, n*G, D)
            groups = kv.view(2, h, n, g, d).permute(2, 0, 1, 3, 4).contiguous()  # (n, 2, H, G, D)
            self.host.put(layer, slot, first, groups)
            self.summarize(layer, slot, first, groups)

    # -- exact attention ----------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, batch: ForwardBatch, spec: LayerSpec) -> torch.Tensor:
        """Exact attention of q (B, H_q, T, D) over this layer's KV, gathered from host for the
        span the query sees (the chunk's own tokens straight from the GPU)."""
        m, g = batch.meta, self.g
        first = [0 if spec.window is None else max(0, s - spec.window + 1) // g for s in batch.start]
        n_pages = max(-(-n // g) - f for n, f in zip(m["lens"], first))
        b = batch.batch_size
        kv = torch.zeros(b, n_pages, *self.group_shape, device=self.device, dtype=self.dtype)
        for i, (slot, f, n) in enumerate(zip(m["slot_list"], first, m["lens"])):
            span = -(-n // g) - f
            kv[i, :span] = self.host.gather(layer, slot, list(range(f, f + span)))
            self.dense_bytes += span * self.group_bytes
        if batch.num_new > 1:  # the chunk's own tokens straight from the GPU, not the host round trip
            k_new, v_new = m["new_kv"][layer]
            first_t = torch.tensor(first, device=self.device)
            local = batch.positions - first_t[:, None] * g  # (B, T) token index within the gathered span
            bi = torch.arange(b, device=self.device)[:, None].expand_as(local)
            kv[bi, local // g, 0, :, local % g] = k_new.transpose(1, 2)
            kv[bi, local // g, 1, :, local % g] = v_new.transpose(1, 2)
        key = spec.window
        if key not in m["masks"]:
            m["masks"][key] = span_mask(torch.tensor(first, device=self.device), n_pages, g, batch.positions, key)
        h, d = self.group_shape[1], self.group_shape[3]
        k = kv[:, :, 0].permute(0, 2, 1, 3, 4).reshape(b, h, n_pages * g, d)
        v = kv[:, :, 1].permute(0, 2, 1, 3, 4).reshape(b, h, n_pages * g, d)
        return grouped_sdpa(q, k, v, m["masks"][key], spec.scale, spec.softcap)
