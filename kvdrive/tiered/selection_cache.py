"""The GPU selection cache of one layer: recently selected groups, kept across decode steps.

Each sequence slot owns ``capacity`` cache slots of a preallocated pool
(S * capacity + 1, 2, H_kv, G, D); the last row is a trash row that absorbs the writes of
masked-off lanes, so every update is a fixed-shape tensor operation (no host sync, no
per-group Python). Bookkeeping, all on the cache's device:

* ``table`` (S, N + 1) int32: cache slot of group n of a sequence, -1 if not cached
  (column N is a trash column);
* ``owner`` (S, capacity + 1) int64: group held by each slot, -1 if empty (trash column);
* ``stamp`` (S, capacity + 1) float32: the step a slot was last selected (LRU ablation).

``ensure`` makes a selection resident: hits keep their slot; misses take the slots whose
eviction key is lowest and are copied from the source pool (pinned host) with one masked
kernel; from a compressed source (``StoredRows``), widened to the cache's dtype in the same
launch (``dequant_rows``), the open groups read from their exact rows. Keys: ``lookahead`` (KVDrive) uses the current step's score of the group a slot
holds, so what attention values least leaves first; ``lru`` the last step the slot was
selected; ``none`` empties the cache every step (no cross-step reuse, ShadowKV-style).
Slots of the current selection are never victims, so ``capacity`` >= pages selected.
"""

from __future__ import annotations

import torch

from kvdrive import device as devices
from kvdrive.quant.dequant import dequant_rows
from kvdrive.retrieval.pages import leading
from kvdrive.storage.gather import copy_rows, words
from kvdrive.tiered.host_kv import StoredRows

EVICTIONS = ("lookahead", "lru", "none")
IMPLS = ("auto", "triton", "torch")
_IDX_COUNTERS = ("hits", "prefetched_hits", "misses", "prefetched")


class SelectionCache:
    def __init__(
        self,
        capacity: int,
        max_seqs: int,
        max_groups: int,
        group_shape: tuple,
        device,
        dtype,
        eviction: str = "lookahead",
        impl: str = "auto",
    ):
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {eviction!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        # triton: one kernel per ensure (selection_cache_triton); torch: the reference (CPU default).
        self.impl = impl if impl != "auto" else ("triton" if torch.device(device).type == "cuda" else "torch")
        self.capacity, self.max_seqs, self.n, self.eviction = capacity, max_seqs, max_groups, eviction
        self.pool = torch.zeros(max_seqs * capacity + 1, *group_shape, device=device, dtype=dtype)
        self.trash = max_seqs * capacity
        self.words = words(self.pool)
        self.group_words = self.words.shape[1]
        self.table = torch.full((max_seqs, max_groups + 1), -1, dtype=torch.int32, device=device)
        self.owner = torch.full((max_seqs, capacity + 1), -1, dtype=torch.int64, device=device)
        self.stamp = torch.zeros(max_seqs, capacity + 1, dtype=torch.float32, device=device)
        self.fresh = torch.zeros(max_seqs, capacity + 1, dtype=torch.bool, device=device)  # filled by a prefetch
        self.counters = torch.zeros(len(_IDX_COUNTERS), dtype=torch.int64, device=device)
        # Counter updates are atomic adds (index_add_): micro-batches update them from two streams.
        self._select_idx = torch.tensor([0, 1, 2], device=device)
        self._prefetch_idx = torch.tensor([3], device=device)
        self.fetch_programs = 0  # copy_rows' programs (0: one per tile); the tiered cache sets it
        self.fetch_lane = None  # a stream every fetch runs on, in issue order (micro-batches take turns); None: current
        self._block_c = triton_block(capacity)  # the kernel's slot block (a power of two)
        self._scratch = (
            torch.zeros(max_seqs, self._block_c, dtype=torch.int64, device=device) if self.impl == "triton" else None
        )  # per sequence slot: micro-batches never share a row

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pool, self.table, self.owner, self.stamp))

    def counts(self) -> dict[str, int]:
        """Counters since the last ``reset_counts`` (one host sync)."""
        return dict(zip(_IDX_COUNTERS, self.counters.tolist()))

    def reset_counts(self) -> None:
        """Zero the counters, and forget which slots a prefetch filled: their prefetches were
        counted before, so a later hit on one must not count as a prefetch hit now (with a
        large cache, such slots outlived the reset and precision read above 1)."""
        self.counters.zero_()
        self.fresh.zero_()

    def clear(self, rows: torch.Tensor) -> None:
        """Forget every cached group of sequence slots ``rows`` (B,) int64."""
        self.table.index_fill_(0, rows, -1)  # index_fill_: no host scalar copy (graph-capturable)
        self.owner.index_fill_(0, rows, -1)
        self.fresh.index_fill_(0, rows, False)

    def lookup(self, rows: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """(B, T) pool rows holding ``groups`` (B, T) of ``rows``, the trash row where not cached."""
        slot = self.table[rows[:, None], groups].long()  # (B, T)
        return torch.where(slot >= 0, rows[:, None] * self.capacity + slot, self.trash)

    def ensure(
        self,
        rows: torch.Tensor,
        groups: torch.Tensor,
        listed: torch.Tensor,
        scores: torch.Tensor | None,
        source: torch.Tensor,
        source_rows: torch.Tensor | int,
        step: torch.Tensor,
        prefetch: bool = False,
    ) -> torch.Tensor:
        """Make the listed groups resident; returns their pool rows (B, P) int32 (trash where unlisted).

        rows (B,) int64 sequence slots; groups (B, P) integers (distinct where listed; a strided
        view such as a selection's first head will do); listed (B, P) bool, or (B,) counts: the
        first ``listed[b]`` entries of row b; step () tensor, the decode step (LRU stamp); scores
        (B, N_s) float32 of this step (``lookahead``; N_s <= N); source the pool every group has
        a copy in (pinned host) as int32 word rows, or ``StoredRows`` (compressed: each slot's
        open group is read from its raw row, whatever ``source_rows`` says), ``source_rows``
        (B, P) int64 its rows of ``groups``, or an int n for a pool where sequence slot s owns
        rows s*n .. s*n+n-1; -1 (on disk only) is fetched by nobody: a prefetch skips it, and
        the caller resolves every listed group before a non-prefetch call.

        NOTE: the counts and the int n let the one kernel read a selection as it comes out of
        the selection kernel: the int64 copy, the listed mask and the host rows were five torch
        kernels on each micro-batch's serial chain before the fetch.
        """
        if self.impl == "triton":
            return self._ensure_triton(rows, groups, listed, scores, source, source_rows, step, prefetch)
        b, p = groups.shape
        groups = groups.long()
        if listed.dim() == 1:
            listed = leading(listed, p)
        if isinstance(source_rows, int):
            source_rows = rows[:, None] * source_rows + groups
        if isinstance(source, StoredRows):  # the open group: its exact row
            source_rows = torch.where(
                groups == source.open[rows][:, None], source.raw_from + rows[:, None], source_rows
            )
        n, cap = self.n, self.capacity
        gi = torch.where(listed, groups, n)  # unlisted -> trash column
        tab = self.table[rows]  # (B, N+1)
        own = self.owner[rows]  # (B, C+1)
        cur = tab.gather(1, gi).long()  # (B, P)
        hit = listed & (cur >= 0)
        miss = listed & (cur < 0) & (source_rows >= 0)
        fresh = self.fresh[rows]
        stamp = self.stamp[rows]  # (B, C+1)
        if not prefetch:
            was_fresh = fresh.gather(1, torch.where(hit, cur, cap)) & hit
            self.counters.index_add_(0, self._select_idx, torch.stack((hit.sum(), was_fresh.sum(), miss.sum())))
        else:
            self.counters.index_add_(0, self._prefetch_idx, miss.sum()[None])
        # Eviction key per slot: empty slots first, slots of this selection never.
        selected = torch.zeros(b, n + 1, dtype=torch.bool, device=groups.device).scatter_(1, gi, listed)
        held = own[:, :cap]
        in_use = held >= 0
        if self.eviction == "lookahead" and scores is not None:
            col = held.clamp(min=0, max=scores.shape[1] - 1)
            key = scores.gather(1, col).float()
        else:
            key = stamp[:, :cap].clone()
        key = torch.where(in_use, key, float("-inf")) + 0.0  # + 0.0: -0.0 becomes 0.0
        protect = in_use & selected.gather(1, held.clamp(min=0, max=n))
        key = key.masked_fill(protect, float("inf"))
        order = key.argsort(dim=1, stable=True)  # (B, C): victims first, ties by slot (as the kernel)
        rank = (miss.cumsum(1) - 1).clamp(min=0)
        victim = torch.where(miss, order.gather(1, rank.clamp(max=cap - 1)), cap)  # (B, P); cap = trash column
        old = own.gather(1, victim)  # groups losing their slot
        tab.scatter_(1, torch.where(miss & (old >= 0), old, n), -1)
        tab.scatter_(1, torch.where(miss, gi, n), victim.to(torch.int32).masked_fill(~miss, -1))
        own.scatter_(1, victim, torch.where(miss, gi, -1))
        slot = torch.where(miss, victim, cur).clamp(min=0)
        stamp.scatter_(1, torch.where(listed, slot, cap), step.expand(b, p).to(stamp.dtype))
        fresh.scatter_(1, torch.where(miss, victim, cap), prefetch)
        if not prefetch:
            fresh.scatter_(1, torch.where(hit, slot, cap), False)
        self.table[rows], self.owner[rows], self.stamp[rows], self.fresh[rows] = tab, own, stamp, fresh
        dst = torch.where(miss, rows[:, None] * cap + victim, -1)  # (B, P)
        self._fetch(source, source_rows.clamp(min=0), dst)
        pages = torch.where(listed, rows[:, None] * cap + slot, self.trash)
        return pages.to(torch.int32)

    def _ensure_triton(self, rows, groups, listed, scores, source, source_rows, step, prefetch: bool) -> torch.Tensor:
        """``ensure`` as one bookkeeping kernel per call plus the copy (same results as the torch body)."""
        from kvdrive.tiered.selection_cache_triton import ensure_kernel

        b, p = groups.shape
        pages = torch.empty(b, p, dtype=torch.int32, device=groups.device)
        # The miss list, packed: its first live[0] entries are (source row, pool row) pairs.
        dst = torch.empty(b * p, dtype=torch.int64, device=groups.device)
        src_rows = torch.empty(b * p, dtype=torch.int64, device=groups.device)
        live = torch.zeros(1, dtype=torch.int32, device=groups.device)
        lookahead = self.eviction == "lookahead" and scores is not None
        sc = scores.float().contiguous() if lookahead else self.stamp  # any float tensor: unread
        step = step.reshape(1).to(torch.float32)
        affine = isinstance(source_rows, int)
        src_in = rows if affine else source_rows.contiguous()  # affine: unread
        opened = isinstance(source, StoredRows)
        if groups.stride(1) != 1:
            groups = groups.contiguous()
        if b:
            ensure_kernel[(b,)](
                rows.contiguous(),
                groups,
                groups.stride(0),
                listed.contiguous(),
                src_in,
                source_rows if affine else 0,
                source.open if opened else rows,  # unread unless compressed
                source.raw_from if opened else 0,
                src_rows,
                sc,
                sc.stride(0),
                sc.shape[1],
                self.table,
                self.table.stride(0),
                self.owner,
                self.stamp,
                self.fresh.view(torch.uint8),
                self.owner.stride(0),
                self.counters,
                step,
                self._scratch,
                self._scratch.stride(0),
                pages,
                dst,
                live,
                p,
                self.capacity,
                self.trash,
                LOOKAHEAD=lookahead,
                PREFETCH=prefetch,
                COUNTS=listed.dim() == 1,
                AFFINE=affine,
                OPEN=opened,
                BLOCK_P=triton_block(p),
                BLOCK_C=self._block_c,
                num_warps=4 if self._block_c <= 1024 else 8,
            )
        self._fetch(source, src_rows, dst, live)
        return pages

    def _fetch(self, source, source_rows, dst, live=None) -> None:
        """Copy the missed groups (dst row >= 0; source rows >= 0; with ``live``, the first
        ``live[0]`` entries) from the source pool into this cache's pool (on the fetch lane if
        set: the current stream waits for it, so what the copy reads stays alive and the pages
        are there before attention)."""
        src_rows, dst_rows = source_rows.reshape(-1), dst.reshape(-1)
        lane = self.fetch_lane
        if lane is None:
            self._copy(source, src_rows, dst_rows, live)
            return
        current = devices.current_stream(self.pool.device)
        lane.wait_stream(current)
        with devices.use_stream(lane):
            self._copy(source, src_rows, dst_rows, live)
        current.wait_stream(lane)

    def _copy(self, source, src_rows, dst_rows, live) -> None:
        if isinstance(source, StoredRows):
            dst = self.pool.view(self.pool.shape[0], -1)
            s = source
            dequant_rows(
                s.rows,
                src_rows,
                dst,
                dst_rows,
                s.kv_dtype,
                s.shape,
                raw=s.raw,
                raw_from=s.raw_from,
                programs=self.fetch_programs,
                live=live,
            )
            return
        copy_rows(source, src_rows, self.words, dst_rows, self.group_words, programs=self.fetch_programs, live=live)


def triton_block(n: int) -> int:
    return max(16, 1 << max(0, n - 1).bit_length())
