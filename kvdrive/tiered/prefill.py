"""The prefill side of the tiered cache (a mixin of ``TieredSparseKVCache``, split out by phase).

* ``_append_groups``: a prefill chunk's whole groups go to the host tier as rows (one DMA
  per sequence for a host-only tier) and are summarized from their GPU copy at once;
* ``_dense``: prefill and dense layers attend exactly over the layer's KV gathered from
  host (one layer's KV on the GPU at a time); sliding layers decode from their GPU ring;
* ``place``: initial placement by importance once a prompt is prefilled;
* ``export_kv``: a sequence's KV back out of the tiers (prefix store, tests).

It uses the cache's state (``host``, ``tables``, ``caches``, ``seqs``, ``_summarized``,
``_last_q``, ``_moved``) and its decode methods (``_select_and_fetch``, ``_refresh_slots``).
"""

from __future__ import annotations

import numpy as np
import torch

from kvdrive.retrieval.select import combine_heads
from kvdrive.tiered import tier_ops
from kvdrive.cache.base import ForwardBatch
from kvdrive.cache.contiguous import grouped_sdpa
from kvdrive.cache.sparse import span_mask


class TieredPrefill:
    def place(self, seq_ids) -> None:
        """Initial placement by importance, once a prompt is prefilled: per sparse layer, what the
        prompt's last query selects becomes resident in the GPU cache (a disk tier first reads
        it into the host arena, as most recently used), so decoding starts warm. Counted as
        prefill traffic (``bytes_warm_start``), not as decode hits or misses. No-op unless
        ``warm_start``, for ``eviction='none'`` (nothing survives a step) and ``lowrank_seq``."""
        if not self.tiered.warm_start or self.tiered.eviction == "none":
            return
        seq_ids = tuple(seq_ids)
        slot_list = [self.seqs.slot(s) for s in seq_ids]
        lens = [self.seqs.length(s) for s in seq_ids]
        if not all(s in self._last_q for s in slot_list):
            return  # not prefilled through this cache's attention (e.g. KV imported)
        slots = torch.tensor(slot_list, device=self.device)
        len_t = torch.tensor(lens, device=self.device)
        batch = ForwardBatch(seq_ids, tuple(lens), 0, None, self._meta(slots, slot_list, len_t, lens, False))
        for layer, cache in self.caches.items():
            if self.tables[layer].summarizer.fits_prompt:  # lowrank_seq fits on the whole prompt later
                continue
            q = torch.stack([self._last_q[s][layer] for s in slot_list])  # (B, H_q, D)
            if self.host.may_miss:  # a disk tier: the arena keeps what the prompt's end ranks highest
                key, counts = self.importance(layer, q, slots)
                self._moved["placed_disk_reads"] += self.host.place(layer, slot_list, key, counts) * self.group_bytes
            before = cache.counters.clone()
            self._select_and_fetch(layer, q, batch, self.layer_specs[layer].scale, prefetch=False)
            self._moved["warm_host_to_gpu"] += int(cache.counters[2] - before[2]) * self.group_bytes
            cache.counters.copy_(before)
        for s in slot_list:
            del self._last_q[s]

    def importance(self, layer: int, q: torch.Tensor, slots: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """How much query ``q`` (B, H_q, D) attends each summarized group of ``layer`` (the
        heads' combined scores, as selection ranks them): ((B, N) float32, (B,) groups summarized)."""
        table = self.tables[layer]
        counts = table.counts[slots]
        n = int(counts.max())
        scores = table.summarizer.score(q, table.data[slots, :n], None, self.layer_specs[layer].scale,
                                        counts=counts)  # (B, H_kv, N)
        key = combine_heads(scores, self.sel_cfg.shared_reduce)[:, 0]
        return key.float().cpu().numpy(), counts.cpu().numpy()

    def export_kv(self, seq_id: int, layer: int, start: int, stop: int):
        self.seqs.check_range(seq_id, start, stop)
        g = self.g
        groups = self.host.gather(layer, self.seqs.slot(seq_id), list(range(start // g, -(-stop // g))))
        kv = groups.permute(1, 2, 0, 3, 4).reshape(2, groups.shape[2], -1, groups.shape[4])
        off = start - (start // g) * g
        return kv[0, :, off : off + stop - start].clone(), kv[1, :, off : off + stop - start].clone()

    def _append_groups(self, layer, k, v, batch, rows) -> None:
        """A prefill chunk: the groups it fills whole go to the host tier as whole rows (one DMA
        per sequence for a host-only tier) and are summarized from the GPU copy right away;
        only the partial groups at its ends are written token by token."""
        g, t = self.g, batch.num_new
        table = self.tables.get(layer)
        for b, (slot, start) in enumerate(zip(batch.meta["slot_list"], batch.start)):
            first = -(-start // g)  # first group that starts inside the chunk
            n = (start + t) // g - first  # groups the chunk covers whole
            if n <= 0:
                tier_ops.write_tokens(self.host.typed(layer), rows[b : b + 1], batch.meta["offs"][b : b + 1],
                                      k[b : b + 1], v[b : b + 1])
                continue
            lo, hi = first * g - start, (first + n) * g - start  # token span of the whole groups
            for a, z in ((0, lo), (hi, t)):
                if z > a:
                    tier_ops.write_tokens(self.host.typed(layer), rows[b : b + 1, a:z],
                                          batch.meta["offs"][b : b + 1, a:z], k[b : b + 1, :, a:z],
                                          v[b : b + 1, :, a:z])
            h, d = k.shape[1], k.shape[3]
            kv = torch.stack((k[b, :, lo:hi], v[b, :, lo:hi]))  # (2, H, n*G, D)
            groups = kv.view(2, h, n, g, d).permute(2, 0, 1, 3, 4).contiguous()  # (n, 2, H, G, D)
            self.host.put(layer, slot, first, groups)
            if table is not None and not table.summarizer.fits_prompt:  # lowrank_seq fits on the whole prompt
                self._refresh_slots(layer, [slot], [first * g])  # the group the chunk completed, if any
                table.write(slot, torch.arange(first, first + n, device=self.device), groups[:, 0])
                self._summarized[layer][slot] = first + n

    def _dense(self, layer, q, batch, spec) -> torch.Tensor:
        """Exact attention over this layer's KV, gathered from host for the span the query sees."""
        m, g = batch.meta, self.g
        first = [0 if spec.window is None else max(0, s - spec.window + 1) // g for s in batch.start]
        n_pages = max(-(-n // g) - f for n, f in zip(m["lens"], first))
        b = batch.batch_size
        kv = torch.zeros(b, n_pages, *self.group_shape, device=self.device, dtype=self.dtype)
        for i, (slot, f, n) in enumerate(zip(m["slot_list"], first, m["lens"])):
            span = -(-n // g) - f
            kv[i, :span] = self.host.gather(layer, slot, list(range(f, f + span)))
            self._moved["dense_host_to_gpu"] += span * self.group_bytes
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
