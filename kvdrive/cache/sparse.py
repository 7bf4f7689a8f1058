"""The sparse cache: KV kept as groups; decode attends to [sinks | top-k | window].

Every layer's KV lives in a GPU pool of groups (S * max_groups, 2, H_kv, G, D);
sequence slot ``s`` owns pages ``[s * max_groups, (s + 1) * max_groups)``. Attention:

* prefill (T > 1) and sliding-window layers: exact attention over the gathered
  contiguous KV (the same numbers as the plain cache);
* decode (T = 1) on global layers: the query scores the key summaries of the full
  groups, ``select_groups`` keeps sinks, the recent window (the partly filled group
  included) and the best groups under the token budget, batched over sequences of
  different lengths, and attention runs exactly over those pages. A budget that
  covers the context selects every group: the result is full attention.

Summaries are brought up to date at each decode step for the groups filled since the
last one (the whole prompt at the first step, where ``lowrank_seq`` also fits its
per-sequence basis on the prompt's keys). Everything stays on the GPU here (Quest-style);
the tiered decode engine moves groups between tiers under the same selection.

``kv_dtype`` (fp8, int8, int4): decode attends to each full group as the storage format's round
trip returns it (``kvdrive.quant``: what a fetch from compressed host or disk tiers
delivers), the partly filled group exact; summaries stay computed from the exact keys. The
accuracy harness measures a storage format this way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kvdrive.cache.base import ForwardBatch, KVCache
from kvdrive.cache.contiguous import chunk_attention, grouped_sdpa, layer_specs
from kvdrive.cache.slots import SequenceSlots
from kvdrive.config import ModelConfig
from kvdrive.errors import KvdriveError
from kvdrive.quant.formats import check_kv_dtype, dequantize, quantize
from kvdrive.retrieval.pages import to_slots
from kvdrive.retrieval.select import Budget, SelectionConfig, select_groups
from kvdrive.retrieval.sparse_attention import sparse_attention
from kvdrive.retrieval.summaries import SUMMARIZERS, SummaryTable, make_summarizer

ROUND_TRIP_CHUNK = 4096  # groups quantized at once: bounds the temporaries of a long prompt


# The smallest budget, as a fraction of the context, at which each measured model keeps 95%
# next-token top-1 agreement with full attention and its pass-key and six-key lookups within
# 2 points (docs/eval.md), by (architecture, hidden, layers, query heads, KV heads).
MEASURED_BUDGETS = {
    ("llama", 576, 30, 9, 3): 0.375,  # SmolLM2-135M
    ("gemma3_text", 640, 18, 4, 1): 0.5,  # Gemma 3 270M
}
DEFAULT_BUDGET = 0.5  # models not measured: the largest budget a measured model needed


def default_budget(config: ModelConfig) -> float:
    """The budget ``SparseConfig(budget=None)`` takes for ``config``'s model."""
    key = (config.architecture, config.hidden_size, config.num_hidden_layers)
    key += (config.num_attention_heads, config.num_key_value_heads)
    return MEASURED_BUDGETS.get(key, DEFAULT_BUDGET)


@dataclass(frozen=True)
class SparseConfig:
    """``budget``: tokens attended per decode step on global layers, sinks and window
    included: a fraction of the context if < 1, else a token count; None (the default): the
    model's measured budget (``default_budget``: 37.5% for SmolLM2, 50% for Gemma 3 and for
    models not measured), resolved by ``for_model`` when the cache is built. The other
    defaults are those the accuracy measurements ran with (docs/eval.md)."""

    group_tokens: int = 16
    budget: float | None = None
    sink_tokens: int = 16
    window_tokens: int = 64
    summary: str = "tokenmax"  # a group scores its best token: retrieval survives (docs/eval.md)
    mode: str = "shared"  # shared: one selection per layer (larger reads); per_head: one per KV head
    dense_layers: tuple[int, ...] = ()  # global layers kept dense (Quest/ShadowKV skip the first layers)
    rank: int = 32  # low-rank summaries
    bases: dict | None = None  # lowrank_offline: {layer: (H_kv*D, r) basis}
    kv_dtype: str = "bf16"  # storage format whose round trip decode sees (bf16: exact)

    def __post_init__(self):
        check_kv_dtype(self.kv_dtype)
        if self.group_tokens < 1 or self.sink_tokens < 0 or self.window_tokens < 1:
            raise KvdriveError("group_tokens and window_tokens must be >= 1, sink_tokens >= 0")
        if self.budget is not None and not self.budget > 0:
            raise KvdriveError(f"budget must be > 0 (a fraction < 1 or a token count), got {self.budget}")
        if self.summary not in SUMMARIZERS:
            raise KvdriveError(f"unknown summary {self.summary!r}; choose one of {', '.join(SUMMARIZERS)}")
        if self.summary == "lowrank_offline" and not self.bases:
            raise KvdriveError(
                "lowrank_offline needs fitted bases: pass bases=kvdrive.eval.calibrate.fit_bases(...) "
                "(kvdrive eval fits them itself)"
            )

    def for_model(self, config: ModelConfig) -> SparseConfig:
        """This config with ``budget=None`` replaced by the model's measured budget."""
        return self if self.budget is not None else replace(self, budget=default_budget(config))

    def selection(self) -> SelectionConfig:
        b = DEFAULT_BUDGET if self.budget is None else self.budget  # None outside a model: the default
        budget = Budget(fraction=b) if b < 1 else Budget(tokens=int(b))
        g = self.group_tokens
        return SelectionConfig(
            budget=budget, n_sink=-(-self.sink_tokens // g), n_window=-(-self.window_tokens // g), mode=self.mode
        )


class SparseKVCache(KVCache):
    def __init__(
        self,
        config: ModelConfig,
        max_seqs: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
        sparse: SparseConfig = SparseConfig(),
    ):
        sparse = sparse.for_model(config)
        self.layer_specs = layer_specs(config)
        self.config = config
        self.g = g = sparse.group_tokens
        self.max_seqs, self.max_len, self.device, self.dtype = max_seqs, max_len, device, dtype
        self.max_groups = -(-max_len // g)
        h, d = config.num_key_value_heads, config.head_dim
        self.pool = [
            torch.zeros(max_seqs * self.max_groups, 2, h, g, d, device=device, dtype=dtype)
            for _ in range(config.num_hidden_layers)
        ]  # (S*N, 2, H_kv, G, D) per layer
        self.seqs = SequenceSlots(max_seqs, max_len, "sparse cache")
        self.reconfigure(sparse)

    def reconfigure(self, sparse: SparseConfig) -> None:
        """Switch summary, budget or mode; summaries are rebuilt lazily at the next decode
        step (the KV is kept). Evaluation uses this to try many settings on one prefill."""
        if sparse.group_tokens != self.g:
            raise KvdriveError("reconfigure cannot change group_tokens (the pool layout)")
        self.sparse, self.sel_cfg = sparse, sparse.selection()
        config, device, dtype = self.config, self.device, self.dtype
        h, d, max_seqs = config.num_key_value_heads, config.head_dim, self.max_seqs
        self.tables: dict[int, SummaryTable] = {}
        for layer in config.global_layers:
            if layer in sparse.dense_layers:
                continue
            summ = layer_summarizer(sparse, layer, h, d, max_seqs, device)
            self.tables[layer] = SummaryTable(summ, max_seqs, self.max_groups, device, dtype)
        self._summarized = {layer: [0] * max_seqs for layer in self.tables}  # full groups summarized, per slot
        # Decode's view of the KV under a compressed storage format: full groups round-tripped as
        # they are summarized, the open group copied exact each step.
        self.stored = (
            {layer: torch.empty_like(self.pool[layer]) for layer in self.tables} if sparse.kv_dtype != "bf16" else {}
        )
        self.last_selection: dict = {}  # layer -> Selection (groups (B, H_kv, P), num_pages (B,))

    @property
    def summary_bytes(self) -> int:
        return sum(t.nbytes for t in self.tables.values())

    # -- bookkeeping ----------------------------------------------------------------
    def add(self, seq_id: int, max_tokens: int, prompt_tokens: int | None = None) -> None:
        slot = self.seqs.add(seq_id, max_tokens)
        for layer, table in self.tables.items():
            table.reset(slot)
            self._summarized[layer][slot] = 0

    def free(self, seq_id: int) -> None:
        self.seqs.free(seq_id)

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget tokens from ``length`` on (their KV is overwritten by later appends)."""
        self.seqs.truncate(seq_id, length)
        slot = self.seqs.slot(seq_id)
        for layer, done in self._summarized.items():
            if done[slot] > length // self.g:
                done[slot] = length // self.g
                self.tables[layer].counts[slot] = done[slot]

    def length(self, seq_id: int) -> int:
        return self.seqs.length(seq_id)

    def plan(self, seq_ids, num_new: int) -> ForwardBatch:
        seq_ids = tuple(seq_ids)
        starts = self.seqs.starts(seq_ids, num_new)
        slot_list = [self.seqs.slot(s) for s in seq_ids]
        slots = torch.tensor(slot_list, device=self.device)
        start = torch.tensor(starts, device=self.device)
        positions = start[:, None] + torch.arange(num_new, device=self.device)  # (B, T)
        lens = [s + num_new for s in starts]
        meta = {"slots": slots, "slot_list": slot_list, "lens": lens, "len_t": start + num_new, "dense": {}}
        return ForwardBatch(seq_ids, starts, num_new, positions, meta)

    def commit(self, batch: ForwardBatch) -> None:
        self.seqs.commit(batch.seq_ids, batch.num_new)

    def export_kv(self, seq_id: int, layer: int, start: int, stop: int):
        self.seqs.check_range(seq_id, start, stop)
        base, g = self.seqs.slot(seq_id) * self.max_groups, self.g
        groups = self.pool[layer][base + start // g : base + -(-stop // g)]  # (n, 2, H_kv, G, D)
        kv = groups.permute(1, 2, 0, 3, 4).reshape(2, groups.shape[2], -1, groups.shape[4])
        off = start - (start // g) * g
        return kv[0, :, off : off + stop - start].clone(), kv[1, :, off : off + stop - start].clone()

    # -- data path ------------------------------------------------------------------
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> None:
        pos = batch.positions  # (B, T)
        pages = batch.meta["slots"][:, None] * self.max_groups + pos // self.g
        offs = pos % self.g
        pool = self.pool[layer]
        pool[pages, 0, :, offs] = k.transpose(1, 2)  # (B, T, H_kv, D)
        pool[pages, 1, :, offs] = v.transpose(1, 2)

    def attend(self, layer: int, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        spec = self.layer_specs[layer]
        if batch.num_new > 1 or spec.window is not None or layer not in self.tables:
            return self._dense(layer, q, batch, spec)
        return self._sparse(layer, q, batch, spec)

    def _dense(self, layer, q, batch, spec) -> torch.Tensor:
        """Exact attention over the gathered pages that the window (or the whole context) spans:
        with no mask when the batch shares one start (``chunk_attention``), else under one."""
        m, g = batch.meta, self.g
        key = spec.window
        uniform = len(set(batch.start)) == 1
        if key not in m["dense"]:
            first = [0 if spec.window is None else max(0, s - spec.window + 1) // g for s in batch.start]
            n_pages = max(-(-n // g) - f for n, f in zip(m["lens"], first))
            first_t = torch.tensor(first, device=self.device)
            idx = first_t[:, None] + torch.arange(n_pages, device=self.device)  # (B, P)
            idx = idx.clamp(max=self.max_groups - 1) + m["slots"][:, None] * self.max_groups
            mask = None if uniform else span_mask(first_t, n_pages, g, batch.positions, spec.window)
            m["dense"][key] = (idx, first[0] * g, mask)
        idx, k_start, mask = m["dense"][key]
        b, p = idx.shape
        kv = self.pool[layer][idx]  # (B, P, 2, H_kv, G, D)
        h, d = kv.shape[3], kv.shape[5]
        k = kv[:, :, 0].permute(0, 2, 1, 3, 4).reshape(b, h, p * self.g, d)
        v = kv[:, :, 1].permute(0, 2, 1, 3, 4).reshape(b, h, p * self.g, d)
        if uniform:
            return chunk_attention(q, k, v, batch.start[0], spec, k_start=k_start)
        return grouped_sdpa(q, k, v, mask, spec.scale, spec.softcap)

    def _refresh(self, layer: int, batch: ForwardBatch) -> None:
        """Summarize the groups that filled since this layer's last decode step."""
        table, done = self.tables[layer], self._summarized[layer]
        rows, groups = [], []
        summ = table.summarizer
        for slot, n in zip(batch.meta["slot_list"], batch.start):  # tokens cached before this step
            full = n // self.g
            if done[slot] == 0 and full and summ.fits_prompt:  # lowrank_seq: fit on the prompt
                keys = self.pool[layer][slot * self.max_groups : slot * self.max_groups + full, 0]
                summ.fit(slot, keys.transpose(1, 2).reshape(-1, *keys.shape[1:2], keys.shape[-1]))
            rows += [slot] * (full - done[slot])
            groups += range(done[slot], full)
            done[slot] = full
        if rows:
            rows_t = torch.tensor(rows, device=self.device)
            groups_t = torch.tensor(groups, device=self.device)
            keys = self.pool[layer][rows_t * self.max_groups + groups_t, 0]  # (N, H_kv, G, D)
            table.write(rows_t, groups_t, keys)
            if layer in self.stored:
                self._round_trip(layer, rows_t * self.max_groups + groups_t)
        if layer in self.stored:  # the open group: exact, as the tiered cache writes it token by token
            open_rows = batch.meta["slots"] * self.max_groups + torch.tensor(batch.start, device=self.device) // self.g
            self.stored[layer][open_rows] = self.pool[layer][open_rows]

    def _round_trip(self, layer: int, pages: torch.Tensor) -> None:
        """Full groups ``pages`` (N,) of the pool into ``stored`` as the storage format returns them."""
        fmt, pool = self.sparse.kv_dtype, self.pool[layer]
        for i in range(0, pages.numel(), ROUND_TRIP_CHUNK):
            p = pages[i : i + ROUND_TRIP_CHUNK]
            groups = pool[p]  # (n, 2, H_kv, G, D)
            self.stored[layer][p] = dequantize(quantize(groups, fmt), fmt, tuple(groups.shape[2:]), pool.dtype)

    def _sparse(self, layer, q, batch, spec) -> torch.Tensor:
        self._refresh(layer, batch)
        m, g = batch.meta, self.g
        table = self.tables[layer]
        slots = m["slots"]
        n_max = max(-(-n // g) for n in m["lens"])
        num_groups = (m["len_t"] + g - 1) // g  # (B,) incl. the partly filled group
        qd = q[:, :, 0]  # (B, H_q, D)
        rows = slots if table.summarizer.name == "lowrank_seq" else None
        scores = table.summarizer.score(
            qd, table.data[slots, :n_max], None, spec.scale, rows=rows, counts=table.counts[slots]
        )
        max_pages = min(n_max, max_pages_for(self.sel_cfg, g, max(m["lens"])))
        sel = select_groups(scores, num_groups, self.sel_cfg, g, max_pages=max_pages)
        self.last_selection[layer] = sel
        slot_table = slots[:, None] * self.max_groups + torch.arange(n_max, device=self.device)  # (B, N)
        page_table = to_slots(sel.groups, slot_table)
        last_len = (m["len_t"] - (num_groups - 1) * g).to(torch.int32)
        pool = self.stored.get(layer, self.pool[layer])
        out, _ = sparse_attention(qd, pool, page_table, sel.num_pages, last_len, spec.scale, spec.softcap)
        return out[:, :, None, :]


def layer_summarizer(sparse: SparseConfig, layer: int, num_kv_heads: int, head_dim: int, max_seqs: int, device):
    """The summarizer ``sparse`` asks for, for one layer (its offline basis, or per-sequence bases)."""
    kw = {}
    if sparse.summary == "lowrank_offline":
        kw = {"basis": sparse.bases[layer].to(device)}
    elif sparse.summary == "lowrank_seq":
        kw = {"rank": sparse.rank, "max_seqs": max_seqs, "device": device, "dtype": torch.float32}
    return make_summarizer(sparse.summary, num_kv_heads, head_dim, sparse.group_tokens, **kw)


def max_pages_for(sel: SelectionConfig, group_tokens: int, context: int) -> int:
    """Pages one selection takes at ``context`` tokens: the budget's groups plus the partly filled
    one, never fewer than sinks + window."""
    budget = sel.budget.tokens if sel.budget.tokens is not None else sel.budget.fraction * context
    return max(-(-int(budget) // group_tokens) + 1, sel.n_sink + sel.n_window)


def span_mask(
    first: torch.Tensor, n_pages: int, group_tokens: int, positions: torch.Tensor, window: int | None
) -> torch.Tensor:
    """(B, 1, T, P*G) bool: which keys of a gathered span of ``n_pages`` groups starting at group
    ``first`` (B,) the queries at ``positions`` (B, T) see (causal, within ``window``)."""
    kpos = first[:, None] * group_tokens + torch.arange(n_pages * group_tokens, device=first.device)  # (B, P*G)
    mask = kpos[:, None, :] <= positions[:, :, None]
    if window is not None:
        mask &= kpos[:, None, :] > positions[:, :, None] - window
    return mask[:, None]
