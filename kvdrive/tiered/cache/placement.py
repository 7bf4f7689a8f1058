"""``Placement``: the initial placement by importance (the warm start), once a prompt is prefilled.

Per sparse layer, what the prompt's last query (kept by ``TieredPrefill.remember``) selects
becomes resident in the layer's GPU selection cache, so decoding starts warm; a disk tier
first reads those groups into its host arena, as most recently used (``HostKV.place``, ranked
by ``importance``). The placement's fetches are prefill traffic: the selection caches'
counters are restored after it (they count decode hits and misses only), and the bytes it
moved are counted here (``moved``, since ``reset_counts``). ``lowrank_seq`` layers are left
cold: their basis is fitted on the whole prompt at the first decode step.
"""

from __future__ import annotations

import numpy as np
import torch

from kvdrive.cache.base import ForwardBatch, LayerSpec
from kvdrive.retrieval.select import combine_heads
from kvdrive.tiered.cache.group_summaries import GroupSummaries
from kvdrive.tiered.cache.select_fetch import SelectFetch
from kvdrive.tiered.prefill import TieredPrefill
from kvdrive.tiered.selection_cache import SelectionCache


class Placement:
    def __init__(
        self,
        host,
        summaries: GroupSummaries,
        prefill: TieredPrefill,
        layer_specs: tuple[LayerSpec, ...],
        select_fetch: SelectFetch,
        shared_reduce: str,
    ):
        """``shared_reduce``: how selection combines the heads' scores (``SelectionConfig``)."""
        self.host, self.summaries, self.prefill, self.layer_specs = host, summaries, prefill, layer_specs
        self.select_fetch, self.shared_reduce = select_fetch, shared_reduce
        self.moved = {"warm_host_to_gpu": 0, "placed_disk_reads": 0}  # bytes, since reset_counts

    def reset_counts(self) -> None:
        self.moved = dict.fromkeys(self.moved, 0)

    def place(self, caches: dict[int, SelectionCache], batch: ForwardBatch, step_t: torch.Tensor) -> None:
        """Make what each prompt's last query selects resident in ``caches``: ``batch``, the
        prefilled prompts (no new tokens, their lengths; every one has remembered queries)."""
        slot_list, slots = batch.meta["slot_list"], batch.meta["slots"]
        for layer, cache in caches.items():
            if self.summaries.tables[layer].summarizer.fits_prompt:  # lowrank_seq fits on the whole prompt later
                continue
            q = self.prefill.queries(slot_list, layer)  # (B, H_q, D)
            if self.host.may_miss:  # a disk tier: the arena keeps what the prompt's end ranks highest
                key, counts = self.importance(layer, q, slots)
                placed = self.host.place(layer, slot_list, key, counts)
                self.moved["placed_disk_reads"] += placed * self.host.fetch_bytes
            before = cache.counters.clone()
            self.select_fetch(cache, layer, q, batch, self.layer_specs[layer].scale, step_t, prefetch=False)
            self.moved["warm_host_to_gpu"] += int(cache.counters[2] - before[2]) * self.host.fetch_bytes
            cache.counters.copy_(before)

    def importance(self, layer: int, q: torch.Tensor, slots: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """How much query ``q`` (B, H_q, D) attends each summarized group of ``layer`` (the
        heads' combined scores, as selection ranks them): ((B, N) float32, (B,) groups summarized)."""
        table = self.summaries.tables[layer]
        counts = table.counts[slots]
        n = int(counts.max())
        scores = table.summarizer.score(
            q, table.data[slots, :n], None, self.layer_specs[layer].scale, counts=counts
        )  # (B, H_kv, N)
        key = combine_heads(scores, self.shared_reduce)[:, 0]
        return key.float().cpu().numpy(), counts.cpu().numpy()
