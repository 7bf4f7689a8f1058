"""The paged plain cache: every token of every layer on the device, in fixed-size pages.

Memory: one pool per layer, ``(num_pages, 2, H_kv, G, D)`` (page p holds K and V of G
tokens, every KV head), shared by all sequences; nothing is preallocated per sequence.
``PageAllocator`` (``pages.py``) hands out page ids: a sequence reserves pages for its
``max_tokens`` when it is added and takes them as it grows; ``free`` returns them. The
device page table ``(max_seqs, max_len / G)`` int32 lists each sequence slot's pages in
position order (page i holds tokens i*G ..); new entries are written in place, so a
captured decode graph reading it stays valid (``prepare_replay`` takes the next page
before a replay).

Attention is exact, the same as ``ContiguousKVCache``'s:

* decode (one new token): ``paged_decode``, split-KV (flash-decoding) through the paged
  split-K kernel of ``kvdrive.retrieval.sparse_attention``: one program per (sequence, KV
  head, partition of its pages), all query heads of a KV head in it, partial outputs
  merged by their log-sum-exp. Lengths come from a device tensor; the number of partitions
  depends only on the batch's shape, and each sequence's partitions share its own pages
  (none before its sliding window), so a captured step reads the table's whole width and
  stays valid as sequences grow: it is never captured again for length. On CPU the torch twin.
* a prefill chunk: the pages the chunk sees gathered into contiguous K/V, then
  ``chunk_attention`` (SDPA's flash kernel on CUDA, no mask); with
  ``KVDRIVE_PREFILL_KERNEL=triton`` a global layer's chunk reads the pages in place
  (``flash_prefill.paged_chunk_attention_triton``, no gather); a ragged multi-token batch
  attends under an explicit mask.

``PAGE_TOKENS = 64``: one page is one inner iteration of the kernel (64 tokens, a 16 KiB
contiguous K block per head at D = 128 in bf16), a table of 2,048 entries covers 128K
tokens, and a sequence wastes fewer than 64 tokens' KV.
"""

from __future__ import annotations

import torch

from kvdrive.cache import flash_prefill
from kvdrive.cache.base import ForwardBatch, KVCache, LayerSpec, TierBytes
from kvdrive.cache.contiguous import attention_mask, chunk_attention, grouped_sdpa, layer_specs
from kvdrive.cache.pages import PageAllocator
from kvdrive.cache.slots import SequenceSlots, SlotTensors
from kvdrive.config import ModelConfig
from kvdrive.errors import CapacityError, KvdriveError
from kvdrive.retrieval.sparse_attention import sparse_attention

PAGE_TOKENS = 64


def paged_decode(
    q: torch.Tensor, pool: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor, spec: LayerSpec, impl: str = "auto"
) -> torch.Tensor:
    """Attention of one new token per sequence over its pages.

    q (B, H_q, D), post-RoPE; pool (S, 2, H_kv, G, D); rows int32 (B, P): page i of sequence
    b holds its tokens i*G .. i*G + G - 1; lengths (B,) integer, on q's device: keys of each
    sequence, the new token's included (1 .. P*G). The query sits at position length - 1 and
    sees the keys within ``spec.window`` of it. Returns (B, H_q, D) in q's dtype.
    ``impl``: ``triton``, ``torch`` (the twin) or ``auto`` (triton on CUDA).
    """
    b, p = rows.shape
    g, h_kv = pool.shape[3], pool.shape[2]
    lengths = lengths.to(torch.int32)
    num_pages = (lengths + (g - 1)) // g  # (B,)
    last = lengths - (num_pages - 1) * g  # (B,) tokens of the last page, 1..G
    first = None if spec.window is None else (lengths - spec.window).clamp(min=0)  # (B,) first key seen
    table = rows[:, None, :].expand(b, h_kv, p)  # (B, H_kv, P): every KV head reads the same pages
    out, _ = sparse_attention(q, pool, table, num_pages, last, spec.scale, spec.softcap, impl=impl, first_token=first)
    return out


class PagedKVCache(KVCache):
    supports_cuda_graphs = True  # plan(start=...) gives fixed shapes; the page table is updated in place
    supports_graph_span = False  # decode reads only each sequence's pages: no span, no recapture as it grows
    supports_padded_graphs = True  # the table's last row lists only a scratch page: padding writes there

    def __init__(
        self,
        config: ModelConfig,
        max_seqs: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
        pool_tokens: int | None = None,
        page_tokens: int = PAGE_TOKENS,
        impl: str = "auto",
    ):
        """``pool_tokens``: tokens the pool holds, all sequences together (default: ``max_seqs``
        sequences of ``max_len``, what the contiguous cache allocates, in whole pages);
        ``max_len`` bounds one sequence.
        ``impl``: the decode kernel (``paged_decode``)."""
        if pool_tokens is not None and pool_tokens < 1:
            raise KvdriveError(f"pool_tokens must be >= 1, got {pool_tokens}")
        self.layer_specs = layer_specs(config)
        self.max_seqs, self.device, self.dtype, self.impl = max_seqs, device, dtype, impl
        self.g = page_tokens
        per_seq = -(-max_len // page_tokens)
        self.pages = PageAllocator(-(-pool_tokens // page_tokens) if pool_tokens else max_seqs * per_seq, page_tokens)
        self.max_len = min(max_len, self.pages.num_pages * page_tokens)
        # One scratch page past the allocator's, listed by the pad row past the sequence slots: the
        # padded entries of a graphed decode step write and read only it.
        self.scratch_page, self.pad_slot = self.pages.num_pages, max_seqs
        shape = (
            self.pages.num_pages + 1,
            2,
            config.num_key_value_heads,
            page_tokens,
            config.head_dim,
        )  # (S, 2, H_kv, G, D)
        self.pool = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        width = -(-self.max_len // page_tokens)
        self.table = torch.zeros(max_seqs + 1, width, dtype=torch.int32, device=device)  # (S + 1, P)
        self.table[self.pad_slot] = self.scratch_page
        self.seqs = SequenceSlots(max_seqs, self.max_len)
        self._slot_tensor = SlotTensors(device)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page id, all layers together."""
        return sum(t[0].numel() * t.element_size() for t in self.pool)

    @property
    def token_capacity(self) -> int:
        return self.pages.num_pages * self.g

    def tier_bytes(self) -> dict[str, TierBytes]:
        """The device's KV: pages held by sequences against the whole pool."""
        return {"gpu": TierBytes(self.pages.num_held * self.page_bytes, self.pages.num_pages * self.page_bytes)}

    def can_add(self, max_tokens: int) -> bool:
        return self.seqs.num_free > 0 and max_tokens <= self.max_len and self.pages.can_reserve(max_tokens)

    def add(self, seq_id: int, max_tokens: int, prompt_tokens: int | None = None) -> None:
        self.seqs.add(seq_id, max_tokens)
        try:
            self.pages.add(seq_id, max_tokens)
        except CapacityError:
            self.seqs.free(seq_id)
            raise

    def free(self, seq_id: int) -> None:
        self.seqs.free(seq_id)
        self.pages.free(seq_id)

    def length(self, seq_id: int) -> int:
        return self.seqs.length(seq_id)

    def _grow(self, seq_id: int, tokens: int) -> None:
        """Pages for ``tokens`` tokens of ``seq_id``, new ones written into its table row."""
        new = self.pages.grow(seq_id, tokens)
        if not new:
            return
        slot, first = self.seqs.slot(seq_id), len(self.pages.pages(seq_id)) - len(new)
        if len(new) == 1:  # a decode step's page: a fill, no host-to-device copy to wait for
            self.table[slot, first] = new[0]
        else:
            self.table[slot, first : first + len(new)] = torch.tensor(new, dtype=torch.int32).to(self.device)

    def prepare_replay(self, seq_ids) -> None:
        """The page each sequence's next token goes to, before a captured decode step replays."""
        for s in seq_ids:
            self._grow(s, self.seqs.length(s) + 1)

    def plan(self, seq_ids, num_new: int, start: torch.Tensor | None = None, span: int | None = None) -> ForwardBatch:
        """``start``: a device tensor (B,) of cached lengths to plan against instead of the
        host's record (CUDA-graph decode); attention then reads the first ``span`` positions'
        table entries (default ``max_len``), so shapes stay fixed while every length is below it."""
        seq_ids = tuple(seq_ids)
        starts = self.seqs.starts(seq_ids, num_new)
        for s, n in zip(seq_ids, starts):
            self._grow(s, n + num_new)
        slots = [self.seqs.slot(s) for s in seq_ids]
        static = start is not None
        start_t = start if static else torch.tensor(starts, device=self.device)
        kv_len = min(span or self.max_len, self.max_len) if static else max(starts) + num_new
        if slots == list(range(slots[0], slots[0] + len(slots))):
            rows = self.table[slots[0] : slots[0] + len(slots), : -(-kv_len // self.g)]  # (B, P) view
        else:
            rows = self.table[self._slot_tensor(slots), : -(-kv_len // self.g)]  # (B, P)
        meta = _Meta(rows, start_t, kv_len, uniform_start=not static and len(set(starts)) == 1)
        positions = start_t[:, None] + torch.arange(num_new, device=self.device)  # (B, T)
        return ForwardBatch(seq_ids=seq_ids, start=starts, num_new=num_new, positions=positions, meta=meta)

    def slot(self, seq_id: int) -> int:
        """The table row of ``seq_id`` (what ``plan_padded`` takes)."""
        return self.seqs.slot(seq_id)

    def plan_padded(self, slots: torch.Tensor, start: torch.Tensor) -> ForwardBatch:
        """A decode step (one new token each) of the sequences in table rows ``slots`` (Bp,) int64,
        cached lengths ``start`` (Bp,), both device tensors a captured graph reads; rows
        ``pad_slot`` (length 0) pad the batch. Pages must already be taken (``prepare_replay``);
        ``commit_decode`` records the step of the real sequences."""
        rows = self.table.index_select(0, slots)  # (Bp, P): the whole width, read only up to each length
        positions = start[:, None] + torch.arange(1, device=self.device)  # (Bp, 1)
        return ForwardBatch(
            seq_ids=(), start=(), num_new=1, positions=positions, meta=_Meta(rows, start, self.max_len, False)
        )

    def commit_decode(self, seq_ids) -> None:
        """After a padded step: its token becomes part of each of ``seq_ids``."""
        self.seqs.commit(tuple(seq_ids), 1)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> None:
        m: _Meta = batch.meta
        pos = batch.positions  # (B, T)
        page = m.rows.gather(1, pos // self.g).long()  # (B, T)
        off = pos % self.g
        pool = self.pool[layer]  # (S, 2, H_kv, G, D)
        pool[:, 0][page, :, off] = k.transpose(1, 2)  # (B, T, H_kv, D)
        pool[:, 1][page, :, off] = v.transpose(1, 2)

    def attend(self, layer: int, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        m: _Meta = batch.meta
        spec = self.layer_specs[layer]
        if batch.num_new == 1:
            out = paged_decode(q[:, :, 0], self.pool[layer], m.rows, m.start + 1, spec, self.impl)  # (B, H_q, D)
            return out[:, :, None]
        if m.uniform_start:  # one shared start: only the pages the chunk sees, causal without a mask
            s = batch.start[0]
            pool, length = self.pool[layer], s + q.shape[2]
            if spec.window is None and spec.softcap is None and flash_prefill.runs(q, pool.shape[2], length):
                return flash_prefill.paged_chunk_attention_triton(q, pool, m.rows, length, spec.scale)
            lo = 0 if spec.window is None else max(0, s - spec.window + 1)
            k, v = self._gather(layer, m.rows, lo // self.g, m.rows.shape[1])
            return chunk_attention(q, k, v, s, spec, k_start=lo // self.g * self.g)
        k, v = self._gather(layer, m.rows, 0, m.rows.shape[1])
        if spec.window not in m.masks:
            m.masks[spec.window] = attention_mask(m.start, batch.num_new, k.shape[2], spec.window)
        return grouped_sdpa(q, k, v, m.masks[spec.window], spec.scale, spec.softcap)

    def _gather(self, layer: int, rows: torch.Tensor, p0: int, p1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of pages [p0, p1) of each row, contiguous: each (B, H_kv, (p1 - p0) * G, D)."""
        x = self.pool[layer][rows[:, p0:p1].long()]  # (B, P, 2, H_kv, G, D)
        b, p, _, h, g, d = x.shape
        x = x.permute(2, 0, 3, 1, 4, 5).reshape(2, b, h, p * g, d)
        return x[0], x[1]

    def commit(self, batch: ForwardBatch) -> None:
        self.seqs.commit(batch.seq_ids, batch.num_new)

    def export_kv(self, seq_id: int, layer: int, start: int, stop: int):
        self.seqs.check_range(seq_id, start, stop)
        p0, p1 = start // self.g, -(-stop // self.g)
        pages = torch.tensor(self.pages.pages(seq_id)[p0:p1], device=self.device, dtype=torch.int32)
        k, v = self._gather(layer, pages[None], 0, p1 - p0)
        lo = start - p0 * self.g
        return k[0, :, lo : lo + stop - start].clone(), v[0, :, lo : lo + stop - start].clone()


class _Meta:
    """Private plan state: the batch's page-table rows (B, P), a view of the static table or a
    gather of it, and masks filled lazily per window (ragged multi-token batches only)."""

    __slots__ = ("rows", "start", "kv_len", "masks", "uniform_start")

    def __init__(self, rows, start, kv_len, uniform_start):
        self.rows, self.start, self.kv_len, self.masks = rows, start, kv_len, {}
        self.uniform_start = uniform_start
