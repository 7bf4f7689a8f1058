"""Top-k group selection under a token budget, batched over sequences of different lengths.

Given scores (B, H_kv, N_max) from a ``GroupSummarizer`` and each sequence's group
count, pick for every sequence (and KV head, in ``per_head`` mode) the groups to attend:
the first ``n_sink`` groups, the last ``n_window`` groups (the partly filled one
included) and the best-scoring others, up to the budget. One top-k over padded rows,
no per-sequence Python loop, no host sync when the caller passes ``max_pages``.

Selected group indices come out ascending, so the partly filled group is the last
listed page, as the attention kernel expects; ``pages.to_slots`` maps them to pool slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from kvdrive.errors import KvdriveError
from kvdrive.retrieval.pages import leading

MODES = ("shared", "per_head")
SHARED_REDUCE = ("softmax_sum", "max")


@dataclass(frozen=True)
class Budget:
    """Tokens attended per sequence and layer: absolute ``tokens`` or a ``fraction`` of the context."""

    tokens: int | None = None
    fraction: float | None = None

    def __post_init__(self):
        if (self.tokens is None) == (self.fraction is None):
            raise KvdriveError("budget: give exactly one of tokens or fraction")
        if self.tokens is not None and self.tokens <= 0:
            raise KvdriveError(f"budget: tokens must be positive, got {self.tokens}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise KvdriveError(f"budget: fraction must be in (0, 1], got {self.fraction}")

    def groups(self, num_groups: torch.Tensor, group_tokens: int) -> torch.Tensor:
        """(B,) group counts -> (B,) int64 budget in groups (rounded up)."""
        if self.tokens is not None:
            return torch.full_like(num_groups, -(-self.tokens // group_tokens), dtype=torch.int64)
        return torch.ceil(num_groups.double() * self.fraction).to(torch.int64)


@dataclass(frozen=True)
class SelectionConfig:
    budget: Budget
    n_sink: int = 1  # groups always kept from the start
    n_window: int = 4  # most recent groups always kept, the partly filled one included
    mode: str = "shared"  # shared: one selection per layer (larger contiguous reads); per_head
    shared_reduce: str = "softmax_sum"  # how shared mode combines the KV heads' scores

    def __post_init__(self):
        if self.n_sink < 0 or self.n_window < 1:
            raise KvdriveError(f"selection: n_sink must be >= 0 and n_window >= 1, got {self.n_sink}, {self.n_window}")
        if self.mode not in MODES:
            raise KvdriveError(f"selection mode must be one of {MODES}, got {self.mode!r}")
        if self.shared_reduce not in SHARED_REDUCE:
            raise KvdriveError(f"shared_reduce must be one of {SHARED_REDUCE}, got {self.shared_reduce!r}")


class Selection(NamedTuple):
    groups: torch.Tensor  # (B, H_kv, P) int32 group indices, ascending; entries >= count are 0
    num_pages: torch.Tensor  # (B,) int32 (same for every head: the count depends only on the budget)


def combine_heads(scores: torch.Tensor, how: str) -> torch.Tensor:
    """(B, H_kv, N) logit-like scores -> (B, 1, N) for shared selection.

    softmax_sum: each head's softmax over groups, summed: the estimated attention mass a
    group gets over the layer's heads, so no head dominates by its logit scale.
    """
    if how == "max":
        return scores.amax(dim=1, keepdim=True)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with every group masked
    return probs.sum(dim=1, keepdim=True)


def select_groups(
    scores: torch.Tensor,
    num_groups: torch.Tensor,
    cfg: SelectionConfig,
    group_tokens: int,
    max_pages: int | None = None,
    impl: str = "auto",
) -> Selection:
    """scores (B, H_kv, N_max) float (-inf or anything at padding), num_groups (B,) -> Selection.

    Deterministic: ties go to the lower group index, on CPU and GPU alike. Every group is taken
    when the budget covers the sequence. ``max_pages`` is P, at least the largest count
    (the engine knows the lengths on the host); without it one host sync computes it.
    Scores of sink and window groups are ignored (the partly filled group needs no
    summary). ``impl``: see ``_kernel_applies`` (the Triton kernel needs ``max_pages``).
    """
    if max_pages is not None and _kernel_applies(scores, cfg, impl):  # one Triton program per sequence
        return _select_kernel(scores, num_groups, cfg, group_tokens, max_pages)[0]
    b, h, n = scores.shape
    dev = scores.device
    num_groups = num_groups.to(dev, torch.int64)
    floor = min(cfg.n_sink + cfg.n_window, n)
    count = torch.minimum(cfg.budget.groups(num_groups, group_tokens).clamp(min=floor), num_groups)  # (B,)
    if max_pages is None:
        max_pages = int(count.max()) if b else 0
    max_pages = max(1, min(max_pages, n))
    count = count.clamp(max=max_pages)
    idx = torch.arange(n, device=dev)[None, :]  # (1, N)
    valid = idx < num_groups[:, None]  # (B, N)
    forced = valid & ((idx < cfg.n_sink) | (idx >= num_groups[:, None] - cfg.n_window))
    s = torch.nan_to_num(scores.float(), nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    s = s.masked_fill((forced | ~valid)[:, None], float("-inf"))  # (B, H_kv, N): candidates only
    if cfg.mode == "shared":
        s = combine_heads(s, cfg.shared_reduce)  # (B, 1, N)
    s = s.masked_fill(forced[:, None], float("inf")).masked_fill(~valid[:, None], float("-inf"))
    order = _topk_lowest_index_first(s, max_pages)  # (B, h', P)
    keep = torch.arange(max_pages, device=dev)[None, None, :] < count[:, None, None]
    order = torch.where(keep, order, n)  # dropped entries sort last
    groups = torch.sort(order, dim=-1).values
    groups = torch.where(groups == n, 0, groups).to(torch.int32)
    return Selection(groups.expand(b, h, max_pages), count.to(torch.int32))


def select_groups_keyed(
    scores: torch.Tensor,
    num_groups: torch.Tensor,
    cfg: SelectionConfig,
    group_tokens: int,
    max_pages: int,
    impl: str = "auto",
) -> tuple[Selection, torch.Tensor]:
    """``select_groups`` and the heads' combined scores (B, N) of the unmasked ``scores`` (the
    tiered cache's lookahead eviction key): one kernel where ``kernel_applies``."""
    if _kernel_applies(scores, cfg, impl):
        return _select_kernel(scores, num_groups, cfg, group_tokens, max_pages)
    return (
        select_groups(scores, num_groups, cfg, group_tokens, max_pages=max_pages, impl="torch"),
        combine_heads(scores, cfg.shared_reduce)[:, 0],
    )


def _kernel_applies(scores: torch.Tensor, cfg: SelectionConfig, impl: str) -> bool:
    """The Triton selection runs for shared mode with ``softmax_sum`` and a token budget, on CUDA
    (``impl='auto'``; ``'triton'`` forces it, e.g. under TRITON_INTERPRET=1); the two agree
    (tests/retrieval/test_select.py)."""
    use = impl == "triton" or (impl == "auto" and scores.is_cuda)
    return (
        use
        and cfg.mode == "shared"
        and cfg.shared_reduce == "softmax_sum"
        and cfg.budget.tokens is not None
        and scores.shape[-1] <= SELECT_KERNEL_MAX_GROUPS
    )


def _select_kernel(
    scores, num_groups, cfg: SelectionConfig, group_tokens: int, max_pages: int, chunk: int | None = None
):
    """``chunk``: groups per program of the split kernels, 0 for one program per sequence;
    None: split rows longer than ``SPLIT_MIN_GROUPS`` into ``SPLIT_CHUNK``s, else one program."""
    import triton

    b, h, n = scores.shape
    if chunk is None and n > SPLIT_MIN_GROUPS:
        chunk = SPLIT_CHUNK
    p = max(1, min(max_pages, n))
    groups = torch.empty(b, p, dtype=torch.int32, device=scores.device)
    count = torch.empty(b, dtype=torch.int32, device=scores.device)
    key = torch.empty(b, n, dtype=torch.float32, device=scores.device)
    if b:
        s = scores if scores.stride(2) == 1 else scores.contiguous()
        ng = num_groups.to(scores.device).contiguous()
        args = (n, p, -(-cfg.budget.tokens // group_tokens))
        sel = (cfg.n_sink, cfg.n_window, min(cfg.n_sink + cfg.n_window, n))
        block_p = max(16, triton.next_power_of_2(p))
        if chunk:
            _select_split(s, ng, groups, count, key, args, sel, chunk, block_p)
        else:
            from kvdrive.retrieval.select_triton import select_shared_kernel

            block_n = max(16, triton.next_power_of_2(n))
            select_shared_kernel[(b,)](
                s,
                s.stride(0),
                s.stride(1),
                ng,
                groups,
                count,
                key,
                *args,
                *sel,
                H=h,
                BLOCK_N=block_n,
                BLOCK_P=block_p,
                num_warps=_select_warps(block_n),
            )
    return Selection(groups[:, None, :].expand(b, h, p), count), key


def _select_split(s, ng, groups, count, key, args, sel, chunk: int, block_p: int) -> None:
    """Launch the five steps of ``select_split_triton`` (its docstring says why and how)."""
    import triton

    from kvdrive.retrieval import select_split_triton as k

    b, h, n = s.shape
    c = -(-n // chunk)
    c_block = max(2, triton.next_power_of_2(c))
    tail = (*args, sel[2])  # N, P, budget_groups, floor: what the threshold passes take
    dev = s.device
    stats = torch.empty(b, c, h, 4, dtype=torch.float32, device=dev)
    ordered = torch.empty(b, n, dtype=torch.int64, device=dev)
    hist = torch.empty(b, 4, k.NUM_BINS, dtype=torch.int32, device=dev)  # zeroed by split_stats_kernel
    counts = torch.empty(b, c, 2, dtype=torch.int32, device=dev)
    grid, w = (b, c), max(1, min(8, chunk // 256))
    k.split_stats_kernel[grid](s, s.stride(0), s.stride(1), ng, stats, hist, *args, *sel, H=h, CHUNK=chunk, num_warps=w)
    k.split_mass_kernel[grid](
        s,
        s.stride(0),
        s.stride(1),
        ng,
        stats,
        key,
        ordered,
        hist,
        *args,
        *sel,
        H=h,
        CHUNK=chunk,
        C_BLOCK=c_block,
        num_warps=w,
    )
    for pass_ in (1, 2, 3):
        k.split_hist_kernel[grid](ng, ordered, hist, *tail, PASS=pass_, CHUNK=chunk, num_warps=w)
    k.split_count_kernel[grid](ng, ordered, hist, counts, *tail, CHUNK=chunk, num_warps=w)
    k.split_write_kernel[grid](
        ng, ordered, hist, counts, groups, count, *tail, CHUNK=chunk, C_BLOCK=c_block, BLOCK_P=block_p, num_warps=w
    )


def _select_warps(block_n: int) -> int:
    """Warps of a selection program: one program per sequence is latency bound, and more warps
    shorten it up to 16 (measured per row length: docs/attention.md)."""
    return min(16, max(4, block_n // 256))


SELECT_KERNEL_MAX_GROUPS = 1 << 15  # one program holds a row of group scores in registers
SPLIT_MIN_GROUPS = 4096  # longer rows (above 64K tokens at G=16) take the split kernels
SPLIT_CHUNK = 1024  # groups per program of the split kernels


def _topk_lowest_index_first(s: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest of float32 s (..., N), best first; ties go to the lower index.

    NOTE: topk is a radix select (a full stable sort of long rows costs far more); its tie
    order is unspecified, so the key packs the score's order-preserving
    int32 image above the reversed index into one int64: no two keys are equal.
    """
    n = s.shape[-1]
    bits = (s + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)  # monotone in the float
    idx = torch.arange(n, device=s.device, dtype=torch.int64)
    key = (ordered << 32) | (n - 1 - idx)
    return torch.topk(key, k, dim=-1, sorted=True).indices  # best first: callers keep a prefix


def selection_mask(sel: Selection, n_max: int) -> torch.Tensor:
    """(B, H_kv, n_max) bool: which groups a selection lists."""
    b, h, p = sel.groups.shape
    listed = leading(sel.num_pages.long(), p)[:, None, :]
    mask = torch.zeros(b, h, n_max + 1, dtype=torch.bool, device=sel.groups.device)
    idx = torch.where(listed, sel.groups.long(), n_max)  # unlisted entries land in a spare column
    return mask.scatter_(2, idx, True)[..., :n_max]
