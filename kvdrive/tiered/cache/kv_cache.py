"""``TieredSparseKVCache``: the ``KVCache`` of the tiered sparse cache (the package docstring
says where things live).

Owns the sequences, the per-layer GPU selection caches (``caches``: replaced whole by
``rebalance``, so the parts are handed the layer's cache per call), the window rings and the
step counters, and composes the parts that own the phases: ``TieredPrefill`` (prefill writes
and exact attention), ``GroupSummaries`` (summary tables), ``SelectFetch`` (a sparse layer's
selection made resident), ``SparseDecode`` (a sparse layer's prefetch and attention, across
streams), ``Placement`` (the warm start), ``sealing.seal`` (compressed tiers),
``step_meta`` (what a forward's layers share) and ``stats.report``.

A step runs ``plan`` (host rows opened, the step's metadata), then per layer ``hint``,
``append`` and ``attend``, then ``commit`` (groups that filled sealed and written behind).
A graphed step derives every tensor from the device (``plan(start=...)``) and does its host
work before the replay (``prepare_replay``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from kvdrive import device as devices
from kvdrive.cache.base import ForwardBatch, KVCache, TierBytes
from kvdrive.cache.contiguous import layer_specs
from kvdrive.cache.slots import SequenceSlots, SlotTensors
from kvdrive.cache.sparse import max_pages_for
from kvdrive.config import ModelConfig
from kvdrive.models.flops import prefill_activation_bytes
from kvdrive.storage.layout import GroupLayout
from kvdrive.tiered import admission, tier_ops
from kvdrive.tiered.cache.group_summaries import GroupSummaries
from kvdrive.tiered.cache.placement import Placement
from kvdrive.tiered.cache.sealing import seal
from kvdrive.tiered.cache.select_fetch import SelectFetch, send_selections
from kvdrive.tiered.cache.sparse_decode import SparseDecode
from kvdrive.tiered.cache.stats import report
from kvdrive.tiered.cache.step_meta import add_positions, step_meta
from kvdrive.tiered.config import TieredConfig, resolve_parts
from kvdrive.tiered.disk_host_kv import DiskBackedHostKV
from kvdrive.tiered.host_kv import FullHostKV
from kvdrive.tiered.prefill import TieredPrefill
from kvdrive.tiered.selection_cache import SelectionCache
from kvdrive.tiered.step_profile import StepProfile, no_mark
from kvdrive.tiered.window_ring import WindowRing


class TieredSparseKVCache(KVCache):
    supports_profile = True

    def __init__(
        self,
        config: ModelConfig,
        max_seqs: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
        tiered: TieredConfig = TieredConfig(),
    ):
        tiered = tiered.for_model(config)
        if tiered.cache_tokens == "auto":  # sized now, from the free GPU memory and the batch
            tiered = replace(
                tiered, cache_tokens=admission.resolve_cache_tokens(config, max_seqs, max_len, dtype, tiered, device)
            )
        tiered = resolve_parts(tiered, device)  # micro_batches and fetch_programs: "auto" -> numbers
        self.config, self.tiered, self.layer_specs = config, tiered, layer_specs(config)
        self.sparse, self.sel_cfg = tiered.sparse, tiered.sparse.selection()
        self.g = g = tiered.sparse.group_tokens
        self.max_seqs, self.max_len, self.device, self.dtype = max_seqs, max_len, device, dtype
        self.n = -(-max_len // g)
        layout = GroupLayout.from_config(config, dtype, g, tiered.kv_dtype)
        self.group_shape, self.group_bytes = layout.slot_shape, layout.group_bytes  # (2, H_kv, G, D)
        admission.check_gpu_room(
            max_seqs * admission.gpu_bytes_per_seq(config, max_len, dtype, tiered), device, max_seqs
        )
        self.host = (
            DiskBackedHostKV(layout, max_seqs, self.n, device, tiered.host_bytes, tiered.disk, tiered.direct)
            if tiered.disk
            else FullHostKV(layout, max_seqs, self.n, device)
        )
        self.seqs = SequenceSlots(max_seqs, max_len, "tiered cache")
        self.sparse_layers = [l for l in config.global_layers if l not in tiered.sparse.dense_layers]
        h, d = config.num_key_value_heads, config.head_dim
        self.summaries = GroupSummaries(
            tiered.sparse, self.sparse_layers, self.host, h, d, max_seqs, self.n, device, dtype
        )
        self.tables = self.summaries.tables
        self.prefill = TieredPrefill(
            self.host,
            layout,
            self.layer_specs,
            self.summaries.whole,
            device,
            tiered.stage_prefill,
            self._seal,
            lambda tokens: prefill_activation_bytes(config, dtype.itemsize, tokens),
        )
        # Sliding-window layers decode from a GPU ring of their last tokens (no host gather per step).
        self.rings = {
            l: WindowRing(max_seqs, h, min(spec.window, max_len), d, device, dtype)
            for l, spec in enumerate(self.layer_specs)
            if spec.window is not None
        }
        self.max_pages = min(self.n, max_pages_for(self.sel_cfg, g, max_len))
        # Micro-batches fetch on one lane, in issue order: they take turns on PCIe (see engine.micro_batch).
        self.fetch_lane = devices.new_stream(device) if tiered.micro_batches > 1 and tiered.fetch_lane else None
        self.caches = self._make_caches(
            {l: admission.even_capacity(tiered, self.max_pages) for l in self.sparse_layers}
        )
        self.steps = 0
        self._stats_steps = 0  # steps at the last reset_stats
        self._token_writes = 0  # bytes of new tokens written to the host tier
        # Graphs: every layer sparse, and no host work per layer: a host-only tier, or disk misses deferred.
        self.defer = bool(tiered.disk) and tiered.disk_misses == "defer"
        self.supports_cuda_graphs = (
            device.type == "cuda" and (not tiered.disk or self.defer) and len(self.caches) == config.num_hidden_layers
        )
        self.graph_epoch = 0
        # Per-step state is per sequence and counters add atomically: batch parts may run concurrently.
        self.supports_micro_batches, self.micro_batches = True, tiered.micro_batches
        self._slot_tensor = SlotTensors(device)  # memoised: a capture may not copy from the host
        self.step_t = torch.zeros((), device=device)  # decode steps, on the device (LRU stamps)
        self.profile: StepProfile | None = None  # set ``StepProfile(device)`` for a per-phase breakdown (eager)
        # Layers whose groups are predicted and fetched while the layer before runs (not layer 0).
        self.hint_layers = frozenset(l for l in self.sparse_layers if l > 0) if tiered.prefetch else frozenset()
        self.select_fetch = SelectFetch(
            self.summaries, self.host, self.sel_cfg, self.n, self.max_pages, self.defer, device
        )
        self.decode = SparseDecode(self.select_fetch, tiered, h, device)
        self.placement = Placement(
            self.host, self.summaries, self.prefill, self.layer_specs, self.select_fetch, self.sel_cfg.shared_reduce
        )

    seqs_that_fit = staticmethod(admission.seqs_that_fit)
    gpu_bytes_per_seq = staticmethod(admission.gpu_bytes_per_seq)

    # -- capacity -------------------------------------------------------------------
    def _make_caches(self, capacity: dict[int, int]) -> dict[int, SelectionCache]:
        caches = {
            l: SelectionCache(c, self.max_seqs, self.n, self.group_shape, self.device, self.dtype, self.tiered.eviction)
            for l, c in capacity.items()
        }
        for c in caches.values():
            c.fetch_programs, c.fetch_lane = self.tiered.fetch_programs, self.fetch_lane
        return caches

    def rebalance(self) -> dict[int, int]:
        """Split the cache slots over layers in proportion to each layer's misses so far (each
        keeps at least one selection's pages and needs no more than all of a sequence's
        groups); caches restart empty. Returns the capacities."""
        total = sum(c.capacity for c in self.caches.values())
        misses = {l: c.counts()["misses"] for l, c in self.caches.items()}
        spare = total - self.max_pages * len(self.caches)
        weight = sum(misses.values())
        if spare <= 0 or weight == 0:
            return {l: c.capacity for l, c in self.caches.items()}
        capacity = {l: min(self.n, self.max_pages + int(spare * m / weight)) for l, m in misses.items()}
        counters = {l: c.counters.clone() for l, c in self.caches.items()}
        self.caches = None  # free the old pools before the new ones take their place (not 2x at once)
        devices.release_cached(self.device)
        self.caches = self._make_caches(capacity)
        for l, c in self.caches.items():
            c.counters.copy_(counters[l])
        return capacity

    def adapt_prefetch(self) -> frozenset[int]:
        """Stop prefetching for layers whose prediction was selected less than
        ``prefetch_min_precision`` of the time so far (measured per layer; a layer that
        fetched nothing keeps prefetching). Returns the layers that still prefetch."""
        keep = set()
        for layer in self.hint_layers:
            c = self.caches[layer].counts()
            if c["prefetched"] == 0 or c["prefetched_hits"] >= self.tiered.prefetch_min_precision * c["prefetched"]:
                keep.add(layer)
        self.hint_layers = frozenset(keep)
        return self.hint_layers

    # -- initial placement ----------------------------------------------------------
    def place(self, seq_ids) -> None:
        """Initial placement by importance, once a prompt is prefilled: per sparse layer, what the
        prompt's last query selects becomes resident in the GPU cache (a disk tier first reads
        it into the host arena, as most recently used), so decoding starts warm. Counted as
        prefill traffic (``bytes_warm_start``), not as decode hits or misses. No-op unless
        ``warm_start``, for ``eviction='none'`` (nothing survives a step) and ``lowrank_seq``."""
        seq_ids = tuple(seq_ids)
        slot_list = [self.seqs.slot(s) for s in seq_ids]
        self.prefill.release(slot_list)  # the prompts are prefilled: their GPU stage goes
        if not self.tiered.warm_start or self.tiered.eviction == "none":
            return
        lens = [self.seqs.length(s) for s in seq_ids]
        if not self.prefill.has_queries(slot_list):
            return  # not prefilled through this cache's attention (e.g. KV imported)
        slots = torch.tensor(slot_list, device=self.device)
        len_t = torch.tensor(lens, device=self.device)
        batch = ForwardBatch(seq_ids, tuple(lens), 0, None, step_meta(slots, slot_list, len_t, lens, False, self.g))
        self.placement.place(self.caches, batch, self.step_t)
        self.prefill.forget(slot_list)

    def importance(self, layer: int, q: torch.Tensor, slots: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """How much query ``q`` (B, H_q, D) attends each summarized group of ``layer`` (the
        heads' combined scores, as selection ranks them): ((B, N) float32, (B,) groups summarized)."""
        return self.placement.importance(layer, q, slots)

    def export_kv(self, seq_id: int, layer: int, start: int, stop: int):
        self.seqs.check_range(seq_id, start, stop)
        g = self.g
        groups = self.host.gather(layer, self.seqs.slot(seq_id), list(range(start // g, -(-stop // g))))
        kv = groups.permute(1, 2, 0, 3, 4).reshape(2, groups.shape[2], -1, groups.shape[4])
        off = start - (start // g) * g
        return kv[0, :, off : off + stop - start].clone(), kv[1, :, off : off + stop - start].clone()

    # -- bookkeeping ----------------------------------------------------------------
    def add(self, seq_id: int, max_tokens: int, prompt_tokens: int | None = None) -> None:
        slot = self.seqs.add(seq_id, max_tokens)
        self.host.clear(slot)
        self.prefill.forget([slot])
        self.prefill.reserve(slot, max_tokens if prompt_tokens is None else min(prompt_tokens, max_tokens))
        self.summaries.reset(slot)
        rows = torch.tensor([slot], device=self.device)
        for cache in self.caches.values():
            cache.clear(rows)

    def free(self, seq_id: int) -> None:
        self.prefill.release([self.seqs.free(seq_id)])

    def length(self, seq_id: int) -> int:
        return self.seqs.length(seq_id)

    def plan(self, seq_ids, num_new: int, start: torch.Tensor | None = None, new_step: bool = True) -> ForwardBatch:
        """``start``: a device tensor (B,) of cached lengths (CUDA-graph decode): then every tensor
        of the step derives from it on the GPU with fixed shapes (scores span all N groups, P is
        the budget at ``max_len``), and the host-side work of a step runs in ``prepare_replay``.
        ``new_step=False``: a later part of a micro-batched decode step (counted once)."""
        seq_ids = tuple(seq_ids)
        starts = self.seqs.starts(seq_ids, num_new)
        slot_list = [self.seqs.slot(s) for s in seq_ids]
        static = start is not None
        if static:
            slots = self._slot_tensor(slot_list)
        else:
            slots = torch.tensor(slot_list, device=self.device)
            start = torch.tensor(starts, device=self.device)
            self._host_side(seq_ids, starts, num_new, new_step)
            if num_new > 1:
                self.prefill.begin(slot_list, starts, num_new)  # a prompt from position 0 keeps its KV on the GPU
            else:
                self.prefill.release(slot_list)  # decoding: the prompt is done
        positions = start[:, None] + torch.arange(num_new, device=self.device)  # (B, T)
        if num_new == 1 and new_step:
            self.step_t += 1
        if num_new > 1 or self.tiered.eviction == "none":  # prefill rewrites groups; none: no reuse
            for c in self.caches.values():
                c.clear(slots)
        meta = step_meta(slots, slot_list, start + num_new, [s + num_new for s in starts], static, self.g)
        add_positions(meta, positions, self.g, self.host)
        return ForwardBatch(seq_ids, starts, num_new, positions, meta)

    def prepare_replay(self, seq_ids) -> None:
        """Host-side work of a graphed decode step, before the replay: open groups on the host
        tier, summaries of groups that filled, capacity rebalancing (which changes ``graph_epoch``:
        the caller must capture again)."""
        seq_ids = tuple(seq_ids)
        starts = self.seqs.starts(seq_ids, 1)
        self._host_side(seq_ids, starts, 1)
        slot_list = [self.seqs.slot(s) for s in seq_ids]
        for layer in self.caches:
            self.summaries.refresh(layer, slot_list, starts)

    def _host_side(self, seq_ids, starts, num_new, new_step: bool = True) -> None:
        self.host.begin([self.seqs.slot(s) for s in seq_ids], starts, num_new)
        if num_new == 1 and new_step:
            self.steps += 1
            if self.tiered.rebalance_after and self.steps == self.tiered.rebalance_after + 1:
                self.adapt_prefetch()
                self.rebalance()
                self.graph_epoch += 1

    def commit(self, batch: ForwardBatch) -> None:
        self._token_writes += batch.batch_size * batch.num_new * self.group_bytes // self.g * len(self.layer_specs)
        if batch.meta["selections"]:  # deferred disk misses: the step's selections go to the host
            send_selections(self.host, batch, self.device)
        # NOTE: the lengths now, not batch.start: a replayed graph's batch keeps its capture's
        # starts, and with them no group ever filled, so none was written behind to disk.
        starts = self.seqs.starts(batch.seq_ids, batch.num_new)
        if (
            self.host.compressed and batch.num_new == 1
        ):  # decode groups that filled: sealed (prefill seals as it writes)
            full = [(slot, st // self.g) for slot, st in zip(batch.meta["slot_list"], starts) if (st + 1) % self.g == 0]
            if full:
                self._seal(range(len(self.layer_specs)), *map(list, zip(*full)), cached=True)
        written = devices.new_event(self.device)
        written.record()
        self.host.end(batch.meta["slot_list"], starts, batch.num_new, written)
        self.seqs.commit(batch.seq_ids, batch.num_new)

    def _seal(self, layers, slot_list: list[int], groups: list[int], cached: bool = False) -> None:
        """``sealing.seal`` over this cache's tiers, with the selection caches it holds now."""
        seal(self.host, self.summaries, self.caches, layers, slot_list, groups, cached)

    # -- data path ------------------------------------------------------------------
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> None:
        m = batch.meta
        if batch.num_new > 1:
            rows = None if self.host.compressed else self.host.rows(layer, m["slots"], batch.positions // self.g)
            self.prefill.write(layer, k, v, batch, rows)
        else:  # the host copy, and the GPU cache's copy of the open group where it holds one
            group = m["group"]
            if self.host.compressed:  # the slot's exact open row
                pool, host_rows = self.host.opened.typed(layer), m["slots"]
            else:
                pool = self.host.typed(layer)
                host_rows = (
                    m["host_rows"]
                    if m["host_rows"] is not None
                    else self.host.rows(layer, m["slots"], group[:, None])[:, 0]
                )
            tier_ops.append_token(pool, host_rows, m["offs"][:, 0], k, v, self.caches.get(layer), m["slots"], group)
        if layer in self.rings:
            self.rings[layer].write(m["slots"], batch.positions, k, v)
        if batch.num_new > 1:  # only the layer being computed: every layer's would be a second copy of the chunk's KV
            m["new_kv"] = {layer: (k, v)}

    def attend(self, layer: int, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        spec = self.layer_specs[layer]
        if batch.num_new == 1 and layer in self.rings:
            return self.rings[layer].attend(q, batch.meta["slots"], batch.positions, spec.scale, spec.softcap)
        if batch.num_new > 1 or layer not in self.caches:
            out = self.prefill.attend(layer, q, batch, spec)
            if batch.num_new > 1 and layer in self.caches and self.tiered.warm_start:
                self.prefill.remember(layer, q, batch.meta["slot_list"])  # the prompt's last query, for ``place``
            return out
        return self._sparse(layer, q, batch, spec)

    def hint(self, layer: int, q_pred: torch.Tensor, batch: ForwardBatch) -> None:
        """A predicted query (B, H_q, D) of ``layer``, issued before the previous layer runs:
        fetch the groups it selects now, on the side stream."""
        if not self.tiered.prefetch or batch.num_new != 1 or layer not in self.caches:
            return
        self.decode.prefetch(self.caches[layer], layer, q_pred, batch, self.layer_specs[layer].scale, self.step_t)

    def _sparse(self, layer, q, batch, spec) -> torch.Tensor:
        mark = self.profile.mark if self.profile is not None and not batch.meta["static"] else no_mark
        return self.decode.attend(self.caches[layer], layer, q, batch, spec, self.step_t, mark)

    def close(self) -> None:
        """Finish disk writes and close the disk pool's files (no-op for a host-only tier)."""
        self.host.close()

    # -- reporting ------------------------------------------------------------------
    def tier_bytes(self) -> dict[str, TierBytes]:
        """``gpu``: selection caches, summaries and window rings, allocated per sequence slot (used:
        the registered sequences' share); ``host`` (and ``disk``): the host KV's own account."""
        gpu = sum(c.nbytes for c in self.caches.values()) + self.summaries.nbytes + self._ring_bytes()
        ids = self.seqs.seq_ids()
        groups = sum(-(-self.seqs.length(s) // self.g) for s in ids)
        return {"gpu": TierBytes(gpu * len(ids) // self.max_seqs, gpu), **self.host.tier_bytes(groups)}

    def _ring_bytes(self) -> int:
        return sum(r.nbytes for r in self.rings.values())

    def reset_stats(self) -> None:
        for c in self.caches.values():
            c.reset_counts()
        self._token_writes = 0
        self.placement.reset_counts()
        self.prefill.dense_bytes = 0
        self._stats_steps = self.steps
        self.host.reset_counts()

    def stats(self) -> dict:
        """Counters since ``reset_stats`` (one host sync per layer)."""
        return report(
            self.caches,
            self.host,
            self.tiered,
            steps=self.steps - self._stats_steps,
            token_writes=self._token_writes,
            warm_start=self.placement.moved["warm_host_to_gpu"],
            placed_from_disk=self.placement.moved["placed_disk_reads"],
            dense_bytes=self.prefill.dense_bytes,
            summary_bytes=self.summaries.nbytes,
            ring_bytes=self._ring_bytes(),
            micro_batches=self.micro_batches,
            fetch_lane=self.fetch_lane is not None,
            prefetch_layers=self.hint_layers,
        )
