"""The tiered sparse cache: full KV in pinned host memory, a GPU selection cache per layer.

Where things live (one ``TieredSparseKVCache`` for all layers of one model):

* host (pinned): every group of every sequence, ``host[l]`` (S * N, 2, H_kv, G, D); each
  new token is written there as it is produced (a kernel writing through UVA);
* GPU: the key summaries of full groups (``SummaryTable``) and, per sparse layer, a
  ``SelectionCache`` of ``capacity[l]`` groups per sequence. Capacities start even and,
  after ``rebalance_after`` decode steps, follow each layer's measured misses (layers
  differ in how much their selection moves between steps).

A decode step on a sparse layer scores the summaries with the query, selects sinks +
window + top groups under the budget (shared by the layer's heads: one whole group per
read), makes the selection resident in the layer's cache (hits stay; misses evict by the
eviction key and are copied from host by one masked kernel driven by GPU indices: no
host sync), then attends over the cache's pages. With ``prefetch``, the model calls
``hint(l + 1, q_pred)`` while layer l computes: layer l+1's groups are predicted from
layer l's hidden state and fetched on a side stream; layer l+1 waits on that event and
then fetches only what the prediction missed. A prompt's prefill keeps its KV of every
layer on the GPU until it is done, where there is room (``TieredPrefill``), and each chunk
attends to it with no mask and no host traffic; without room, and for the decode of dense
layers, attention is exact over KV gathered from host for that layer alone;
sliding-window layers decode from a GPU ring of their last ``window`` tokens
(``WindowRing``), written as tokens arrive.

With ``kv_dtype`` fp8, int8 or int4 the host (and disk) tiers store every full group in that format
and each sequence's open group exact (``host_kv.OpenGroups``): token writes go to the open row;
a group that fills is sealed (quantized on the device into its row, summarized from its exact
keys, and the GPU cache's copy of it replaced by the stored group's round trip, so attention
sees what a fetch would deliver); fetches widen stored groups to the model dtype on the GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np
import torch

from kvdrive import device as devices
from kvdrive.cache.base import ForwardBatch, KVCache, TierBytes
from kvdrive.cache.contiguous import layer_specs
from kvdrive.cache.slots import SequenceSlots
from kvdrive.cache.sparse import layer_summarizer, max_pages_for
from kvdrive.config import ModelConfig
from kvdrive.quant.dequant import dequant_rows
from kvdrive.retrieval.pages import leading
from kvdrive.retrieval.select import combine_heads, select_groups_keyed
from kvdrive.retrieval.sparse_attention import sparse_attention
from kvdrive.retrieval.summaries import SummaryTable
from kvdrive.storage.layout import GroupLayout
from kvdrive.tiered import admission, tier_ops
from kvdrive.tiered.config import TieredConfig, resolve_parts
from kvdrive.tiered.disk_host_kv import DiskBackedHostKV
from kvdrive.tiered.host_kv import FullHostKV
from kvdrive.tiered.prefill import TieredPrefill
from kvdrive.tiered.selection_cache import SelectionCache
from kvdrive.tiered.step_profile import StepProfile
from kvdrive.tiered.window_ring import WindowRing

REFRESH_CHUNK = 4096  # groups gathered from host per summary batch (bounds the temporary)

__all__ = ["StepProfile", "TieredConfig", "TieredSparseKVCache"]


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
        self.tables = {
            l: SummaryTable(layer_summarizer(tiered.sparse, l, h, d, max_seqs, device), max_seqs, self.n, device, dtype)
            for l in self.sparse_layers
        }
        self._summarized = {l: [0] * max_seqs for l in self.sparse_layers}  # groups in each table, per slot
        self.prefill = TieredPrefill(
            self.host, layout, self.layer_specs, self._summarize_whole, device, tiered.stage_prefill, self._seal
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
        self._sides: dict = {}  # compute stream -> its prefetch stream (one per micro-batch stream)
        self._controls: dict = {}  # compute stream -> its control stream (``TieredConfig.control_stream``)
        self.steps = 0
        self._stats_steps = 0  # steps at the last reset_stats
        self._moved = {"token_writes": 0, "warm_host_to_gpu": 0, "placed_disk_reads": 0}
        # Graphs: every layer sparse, and no host work per layer: a host-only tier, or disk misses deferred.
        self.defer = bool(tiered.disk) and tiered.disk_misses == "defer"
        self.supports_cuda_graphs = (
            device.type == "cuda" and (not tiered.disk or self.defer) and len(self.caches) == config.num_hidden_layers
        )
        self.graph_epoch = 0
        # Per-step state is per sequence and counters add atomically: batch parts may run concurrently.
        self.supports_micro_batches, self.micro_batches = True, tiered.micro_batches
        self._slot_tensors: dict[tuple, torch.Tensor] = {}
        self.step_t = torch.zeros((), device=device)  # decode steps, on the device (LRU stamps)
        self.profile: StepProfile | None = None  # set ``StepProfile(device)`` for a per-phase breakdown (eager)
        # Layers whose groups are predicted and fetched while the layer before runs (not layer 0).
        self.hint_layers = frozenset(l for l in self.sparse_layers if l > 0) if tiered.prefetch else frozenset()

    seqs_that_fit = staticmethod(admission.seqs_that_fit)
    gpu_bytes_per_seq = staticmethod(admission.gpu_bytes_per_seq)

    # -- construction ---------------------------------------------------------------
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
        batch = ForwardBatch(seq_ids, tuple(lens), 0, None, self._meta(slots, slot_list, len_t, lens, False))
        for layer, cache in self.caches.items():
            if self.tables[layer].summarizer.fits_prompt:  # lowrank_seq fits on the whole prompt later
                continue
            q = self.prefill.queries(slot_list, layer)  # (B, H_q, D)
            if self.host.may_miss:  # a disk tier: the arena keeps what the prompt's end ranks highest
                key, counts = self.importance(layer, q, slots)
                placed = self.host.place(layer, slot_list, key, counts)
                self._moved["placed_disk_reads"] += placed * self.host.fetch_bytes
            before = cache.counters.clone()
            self._select_and_fetch(layer, q, batch, self.layer_specs[layer].scale, prefetch=False)
            self._moved["warm_host_to_gpu"] += int(cache.counters[2] - before[2]) * self.host.fetch_bytes
            cache.counters.copy_(before)
        self.prefill.forget(slot_list)

    def importance(self, layer: int, q: torch.Tensor, slots: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """How much query ``q`` (B, H_q, D) attends each summarized group of ``layer`` (the
        heads' combined scores, as selection ranks them): ((B, N) float32, (B,) groups summarized)."""
        table = self.tables[layer]
        counts = table.counts[slots]
        n = int(counts.max())
        scores = table.summarizer.score(
            q, table.data[slots, :n], None, self.layer_specs[layer].scale, counts=counts
        )  # (B, H_kv, N)
        key = combine_heads(scores, self.sel_cfg.shared_reduce)[:, 0]
        return key.float().cpu().numpy(), counts.cpu().numpy()

    def export_kv(self, seq_id: int, layer: int, start: int, stop: int):
        self.seqs.check_range(seq_id, start, stop)
        g = self.g
        groups = self.host.gather(layer, self.seqs.slot(seq_id), list(range(start // g, -(-stop // g))))
        kv = groups.permute(1, 2, 0, 3, 4).reshape(2, groups.shape[2], -1, groups.shape[4])
        off = start - (start // g) * g
        return kv[0, :, off : off + stop - start].clone(), kv[1, :, off : off + stop - start].clone()

    # -- bookkeeping ----------------------------------------------------------------
    def add(self, seq_id: int, max_tokens: int) -> None:
        slot = self.seqs.add(seq_id, max_tokens)
        self.host.clear(slot)
        self.prefill.forget([slot])
        self.prefill.reserve(slot, max_tokens)
        rows = torch.tensor([slot], device=self.device)
        for layer, table in self.tables.items():
            table.reset(slot)
            self._summarized[layer][slot] = 0
            self.caches[layer].clear(rows)

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
                self.prefill.begin(slot_list, starts)  # a prompt from position 0 keeps its KV on the GPU
            else:
                self.prefill.release(slot_list)  # decoding: the prompt is done
        positions = start[:, None] + torch.arange(num_new, device=self.device)  # (B, T)
        if num_new == 1 and new_step:
            self.step_t += 1
        if num_new > 1 or self.tiered.eviction == "none":  # prefill rewrites groups; none: no reuse
            for c in self.caches.values():
                c.clear(slots)
        meta = self._meta(slots, slot_list, start + num_new, [s + num_new for s in starts], static)
        meta["offs"] = positions % self.g
        if num_new == 1:  # the decode token's group and (layer-independent where affine) host row
            meta["group"] = positions[:, 0] // self.g
            meta["host_rows"] = slots * self.host.n + meta["group"] if self.host.affine_rows else None
        return ForwardBatch(seq_ids, starts, num_new, positions, meta)

    def _meta(self, slots, slot_list, len_t, lens, static: bool) -> dict:
        """What a forward's layers share: sequence slots, lengths after it (device and host)."""
        num_groups = (len_t + self.g - 1) // self.g  # (B,) incl. the partly filled group
        contiguous = slot_list == list(range(slot_list[0], slot_list[0] + len(slot_list)))
        return {
            "slots": slots,
            "slot_list": slot_list,
            "lens": lens,
            "len_t": len_t,
            "num_groups": num_groups,
            "last_len": (len_t - (num_groups - 1) * self.g).to(torch.int32),
            "static": static,
            "prefetch": {},
            "ahead": {},
            "masks": {},
            "selections": [],
            "slot_range": slice(slot_list[0], slot_list[0] + len(slot_list)) if contiguous else None,
        }

    def prepare_replay(self, seq_ids) -> None:
        """Host-side work of a graphed decode step, before the replay: open groups on the host
        tier, summaries of groups that filled, capacity rebalancing (which changes ``graph_epoch``:
        the caller must capture again)."""
        seq_ids = tuple(seq_ids)
        starts = self.seqs.starts(seq_ids, 1)
        self._host_side(seq_ids, starts, 1)
        slot_list = [self.seqs.slot(s) for s in seq_ids]
        for layer in self.caches:
            self._refresh_slots(layer, slot_list, starts)

    def _host_side(self, seq_ids, starts, num_new, new_step: bool = True) -> None:
        self.host.begin([self.seqs.slot(s) for s in seq_ids], starts, num_new)
        if num_new == 1 and new_step:
            self.steps += 1
            if self.tiered.rebalance_after and self.steps == self.tiered.rebalance_after + 1:
                self.adapt_prefetch()
                self.rebalance()
                self.graph_epoch += 1

    def _slot_tensor(self, slots: list[int]) -> torch.Tensor:
        key = tuple(slots)  # memoised: a capture may not copy from the host
        if key not in self._slot_tensors:
            self._slot_tensors[key] = torch.tensor(slots, device=self.device)
        return self._slot_tensors[key]

    def commit(self, batch: ForwardBatch) -> None:
        self._moved["token_writes"] += (
            batch.batch_size * batch.num_new * self.group_bytes // self.g * len(self.layer_specs)
        )
        if batch.meta["selections"]:  # deferred disk misses: the step's selections go to the host
            self._send_selections(batch)
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

    def _send_selections(self, batch: ForwardBatch) -> None:
        """One asynchronous copy of what each layer selected and left out (``disk_misses="defer"``);
        after a graph replay the captured tensors hold this step's values."""
        layers, groups, flags = zip(*batch.meta["selections"])
        groups = devices.to_host_async(torch.stack(groups).to(torch.int32))
        flags = devices.to_host_async(torch.stack(flags))
        event = devices.new_event(self.device)
        event.record()
        self.host.take_selections(batch.meta["slot_list"], list(layers), groups, flags, event)

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
        if batch.num_new > 1:
            m.setdefault("new_kv", {})[layer] = (k, v)

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
        compute = devices.current_stream(self.device)
        side = self._side(compute)
        if side is not None:
            side.wait_stream(compute)
            if self.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
                q_pred.record_stream(side)
        with devices.use_stream(side) if side is not None else contextlib.nullcontext():
            self._select_and_fetch(layer, q_pred, batch, self.layer_specs[layer].scale, prefetch=True)
            event = devices.new_event(self.device)
            event.record()
        batch.meta["prefetch"][layer] = event

    def _side(self, compute):
        """The prefetch stream of this compute stream (None: prefetch on the compute stream)."""
        return self._companion(self._sides, compute) if self.tiered.overlap else None

    def _control(self, compute):
        """The highest-priority stream of this compute stream (None: the selection runs on it)."""
        if not (self.tiered.control_stream and self.tiered.micro_batches > 1 and self.device.type == "cuda"):
            return None
        return self._companion(self._controls, compute, highest=True)

    def _companion(self, streams: dict, compute, **kind):
        """``streams``' stream for this compute stream (one per micro-batch stream), made once."""
        key = getattr(compute, "cuda_stream", 0)  # CPU: one stand-in
        if key not in streams:
            streams[key] = devices.new_stream(self.device, **kind)
        return streams[key]

    def _sparse(self, layer, q, batch, spec) -> torch.Tensor:
        mark = self.profile.mark if self.profile is not None and not batch.meta["static"] else _no_mark
        mark("compute")
        event = batch.meta["prefetch"].pop(layer, None)
        if event is not None:
            event.wait(devices.current_stream(self.device))
        mark("prefetch_wait")
        qd = q[:, :, 0]  # (B, H_q, D)
        compute = devices.current_stream(self.device)
        control = self._control(compute)
        if control is None:
            pages, num_pages = self._select_and_fetch(layer, qd, batch, spec.scale, prefetch=False, mark=mark)
        else:  # what decides the fetch, ahead of the other part's GEMMs; ordered both ways (no record_stream)
            control.wait_stream(compute)
            with devices.use_stream(control):
                pages, num_pages = self._select_and_fetch(layer, qd, batch, spec.scale, prefetch=False, mark=mark)
            compute.wait_stream(control)
        pages = pages[:, None, :].expand(-1, self.group_shape[1], -1)  # (B, H_kv, P): one selection per layer
        out, _ = sparse_attention(
            qd, self.caches[layer].pool, pages, num_pages, batch.meta["last_len"], spec.scale, spec.softcap
        )
        mark("attention")
        return out[:, :, None, :]

    def _select_and_fetch(self, layer, qd, batch, scale, prefetch: bool, mark=None):
        mark = mark or _no_mark
        m, g = batch.meta, self.g
        if not m["static"]:
            self._refresh_slots(layer, m["slot_list"], batch.start)
        table, slots = self.tables[layer], m["slots"]
        n_max = self.n if m["static"] else max(-(-n // g) for n in m["lens"])
        num_groups = m["num_groups"]
        sl = m["slot_range"] if m["slot_range"] is not None else slots  # a range: views, no gather
        rows = slots if table.summarizer.name == "lowrank_seq" else None
        scores = table.summarizer.score(
            qd, table.data[sl, :n_max], None, scale, rows=rows, counts=table.counts[sl]
        )  # (B, H_kv, N)
        max_pages = min(n_max, self.max_pages if m["static"] else max_pages_for(self.sel_cfg, g, max(m["lens"])))
        sel, key = select_groups_keyed(scores, num_groups, self.sel_cfg, g, max_pages)  # key: lookahead's (B, N)
        num_pages = sel.num_pages
        cache = self.caches[layer]
        mark("select")
        if self.host.affine_rows:  # the selection as it is: first head's groups, counts, host rows s*n + g
            pages = cache.ensure(
                slots,
                sel.groups[:, 0],
                num_pages,
                key,
                self.host.fetch_source(layer),
                self.host.n,
                self.step_t,
                prefetch,
            )
            mark("sync_fetch")
            return pages, num_pages
        if self.defer and not prefetch:  # serve what the GPU cache and host hold; the rest later
            groups, num_pages, src, flags = tier_ops.defer_split(
                sel.groups[:, 0], num_pages, slots, self.host.slot_gpu[layer], cache.table
            )
            m["selections"].append((layer, sel.groups[:, 0], flags))
            pages = cache.ensure(
                slots, groups, num_pages, key, self.host.fetch_source(layer), src, self.step_t, prefetch
            )
            mark("sync_fetch")
            return pages, num_pages
        groups = sel.groups[:, 0].long()  # (B, P)
        listed = leading(num_pages, groups.shape[1])
        src = self.host.rows(layer, slots, groups)  # (B, P) host rows, -1 on disk only
        if prefetch:  # the prefetch skips disk-only groups
            if not self.defer:  # read them ahead (deferred misses: no, that would need a host sync)
                ahead = listed & (src < 0) & (cache.table[slots[:, None], groups] < 0)
                m["ahead"][layer] = (
                    devices.to_host_async(groups),
                    devices.to_host_async(ahead),
                    devices.new_event(self.device),
                )
                m["ahead"][layer][2].record()
        else:  # one host sync: read what the GPU cache and host lack
            self._read_ahead(m, layer)  # not picked up by the layer before: submit it now
            cached = cache.table[slots[:, None], groups] >= 0
            g_np = groups.cpu().numpy()
            keep, cached = torch.stack((listed, cached)).cpu().numpy()  # both masks in one copy
            need = keep & ~cached
            failed = self.host.resolve(layer, m["slot_list"], g_np, need, keep)
            self._read_ahead(m, layer + 1)  # the next layer's disk reads overlap this layer's compute
            if failed.any():  # never served: drop those groups from this step's attention
                groups, listed, num_pages, _ = _compact(groups, listed, torch.as_tensor(failed, device=self.device))
            src = self.host.rows(layer, slots, groups)
            mark("disk_resolve")
        pages = cache.ensure(slots, groups, listed, key, self.host.fetch_source(layer), src, self.step_t, prefetch)
        mark("sync_fetch")
        return pages, num_pages

    def _read_ahead(self, meta, layer: int) -> None:
        """Submit the disk reads of ``layer``'s predicted selection (its hint recorded them)."""
        ahead = meta["ahead"].pop(layer, None)
        if ahead is not None:
            groups, need, event = ahead
            event.synchronize()  # the prediction (side stream) and its copy to the host are done
            self.host.read_ahead(layer, meta["slot_list"], groups.numpy(), need.numpy())

    def _summarize_whole(self, layer: int, slot: int, first: int, groups: torch.Tensor) -> None:
        """A prefill chunk's whole groups ``first ..`` (n, 2, H_kv, G, D) of one sequence, on the
        device: summarized at once (``lowrank_seq`` fits on the whole prompt, at decode)."""
        table = self.tables.get(layer)
        if table is None or table.summarizer.fits_prompt:
            return
        self._refresh_slots(layer, [slot], [first * self.g])  # the group the chunk completed, if any
        table.write(slot, torch.arange(first, first + groups.shape[0], device=self.device), groups[:, 0])
        self._summarized[layer][slot] = first + groups.shape[0]

    def _seal(self, layers, slot_list: list[int], groups: list[int], cached: bool = False) -> None:
        """Compressed tiers: group ``groups[i]`` of slot ``slot_list[i]`` filled in ``layers``: the
        host tier stores it quantized; its summary is taken from the exact keys (where every
        group before it is summarized: else the next refresh summarizes it from host); with
        ``cached`` (decode), the GPU cache's copy of it, written token by token, becomes the
        stored group's round trip, as every later fetch of it will be."""
        layers = list(layers)
        slots = torch.tensor(slot_list, device=self.device)
        groups_t = torch.tensor(groups, device=self.device)
        exact, stored = self.host.seal(layers, slots, groups_t)
        for i, layer in enumerate(layers):
            table = self.tables.get(layer)
            if table is not None and not table.summarizer.fits_prompt:
                done = self._summarized[layer]
                now = [j for j, (s, gr) in enumerate(zip(slot_list, groups)) if done[s] == gr]
                if now:
                    table.write(slots[now], groups_t[now], exact[i, now, 0])
                    for j in now:
                        done[slot_list[j]] = groups[j] + 1
            cache = self.caches.get(layer)
            if cached and cache is not None:
                dst = cache.lookup(slots, groups_t[:, None])[:, 0]  # the trash row where not cached
                lay = self.host.layout
                dequant_rows(
                    stored[i],
                    torch.arange(len(groups), device=self.device),
                    cache.pool.view(cache.pool.shape[0], -1),
                    dst,
                    lay.kv_dtype,
                    lay.group_shape,
                )

    def _refresh_slots(self, layer: int, slot_list, starts) -> None:
        """Summarize the groups filled since this layer's last decode step (keys read from host):
        the whole batch's in one gather and one write per ``REFRESH_CHUNK`` groups (in decode,
        a few sequences complete a group each step; per-sequence calls cost launches)."""
        table, done = self.tables[layer], self._summarized[layer]
        summ = table.summarizer
        pair_slots, pair_groups = [], []
        for slot, n in zip(slot_list, starts):
            full = n // self.g
            if done[slot] == 0 and full and summ.fits_prompt:  # lowrank_seq: fit on the prompt's keys
                keys = torch.cat(
                    [
                        self.host.gather(layer, slot, list(range(i, min(i + REFRESH_CHUNK, full))))[:, 0]
                        for i in range(0, full, REFRESH_CHUNK)
                    ]
                )
                summ.fit(slot, keys.transpose(1, 2).reshape(-1, keys.shape[1], keys.shape[-1]))
            if full > done[slot]:
                pair_slots += [slot] * (full - done[slot])
                pair_groups += range(done[slot], full)
                done[slot] = full
        for i in range(0, len(pair_groups), REFRESH_CHUNK):
            s, g = pair_slots[i : i + REFRESH_CHUNK], pair_groups[i : i + REFRESH_CHUNK]
            table.write(
                torch.tensor(s, device=self.device),
                torch.tensor(g, device=self.device),
                self.host.gather_pairs(layer, s, g)[:, 0],
            )

    def close(self) -> None:
        """Finish disk writes and close the disk pool's files (no-op for a host-only tier)."""
        self.host.close()

    # -- reporting ------------------------------------------------------------------
    def tier_bytes(self) -> dict[str, TierBytes]:
        """``gpu``: selection caches, summaries and window rings, allocated per sequence slot (used:
        the registered sequences' share); ``host`` (and ``disk``): the host KV's own account."""
        gpu = (
            sum(c.nbytes for c in self.caches.values())
            + sum(t.nbytes for t in self.tables.values())
            + sum(r.nbytes for r in self.rings.values())
        )
        ids = self.seqs.seq_ids()
        groups = sum(-(-self.seqs.length(s) // self.g) for s in ids)
        return {"gpu": TierBytes(gpu * len(ids) // self.max_seqs, gpu), **self.host.tier_bytes(groups)}

    def reset_stats(self) -> None:
        for c in self.caches.values():
            c.reset_counts()
        self._moved = dict.fromkeys(self._moved, 0)
        self.prefill.dense_bytes = 0
        self._stats_steps = self.steps
        self.host.reset_counts()

    def stats(self) -> dict:
        """Counters since ``reset_stats`` (one host sync per layer)."""
        per_layer = {l: c.counts() for l, c in self.caches.items()}
        tot = {k: sum(c[k] for c in per_layer.values()) for k in ("hits", "prefetched_hits", "misses", "prefetched")}
        fetched = tot["misses"] + tot["prefetched"]
        selected = tot["hits"] + tot["misses"]
        return {
            "steps": self.steps - self._stats_steps,
            "groups_selected": selected,
            "gpu_hits": tot["hits"] - tot["prefetched_hits"],
            "prefetched_hits": tot["prefetched_hits"],
            "sync_fetched": tot["misses"],
            "prefetched": tot["prefetched"],
            "hit_rate": tot["hits"] / selected if selected else None,
            "bytes_host_to_gpu": fetched * self.host.fetch_bytes
            + self.prefill.dense_bytes
            + self._moved["warm_host_to_gpu"],
            "bytes_warm_start": self._moved["warm_host_to_gpu"],
            "bytes_placed_from_disk": self._moved["placed_disk_reads"],
            "bytes_gpu_to_host": self._moved["token_writes"],
            "gpu_cache_bytes": sum(c.nbytes for c in self.caches.values()),
            "summary_bytes": sum(t.nbytes for t in self.tables.values()),
            "window_ring_bytes": sum(r.nbytes for r in self.rings.values()),
            "host_bytes": self.host.nbytes,
            "kv_dtype": self.tiered.kv_dtype,
            **self.host.stats(),
            "cache_tokens": self.tiered.cache_tokens,  # resolved where the config said "auto"
            "micro_batches": self.micro_batches,
            "fetch_programs": self.tiered.fetch_programs,  # resolved likewise
            "fetch_lane": self.fetch_lane is not None,
            "control_stream": self.tiered.control_stream and self.tiered.micro_batches > 1,
            "capacity_per_layer": {l: c.capacity for l, c in self.caches.items()},
            "prefetch_layers": sorted(self.hint_layers),
            "prefetch_precision_per_layer": {
                l: c["prefetched_hits"] / c["prefetched"] for l, c in per_layer.items() if c["prefetched"]
            },
            "misses_per_layer": {l: c["misses"] for l, c in per_layer.items()},
        }


def _no_mark(name: str) -> None:
    pass


def _compact(groups: torch.Tensor, listed: torch.Tensor, drop: torch.Tensor):
    """A selection (B, P) without its ``drop`` groups, each row's kept groups a prefix in their
    order (the partly filled group, always in host memory, stays last), on the device:
    (groups, listed, num_pages, order), ``order`` the permutation applied to each row."""
    order = torch.sort(drop.to(torch.uint8), dim=1, stable=True).indices
    num_pages = (listed & ~drop).sum(1, dtype=torch.int32)
    return groups.gather(1, order), leading(num_pages, groups.shape[1]), num_pages, order
