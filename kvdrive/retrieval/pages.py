"""Paging helpers: contiguous K/V -> a group pool, and group indices -> pool slots.

Used by tests and benchmarks to build a pool, and by the cache to turn a selection
(group indices within each sequence) into the slots the attention kernel reads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class PagedKV(NamedTuple):
    kv_pool: torch.Tensor  # (S, 2, H_kv, G, D)
    slot_table: torch.Tensor  # (B, N_max) int64: slot of group n of sequence b (0 past the end)
    num_groups: torch.Tensor  # (B,) int64: ceil(len / G)
    last_page_len: torch.Tensor  # (B,) int32: tokens in the last group, 1..G


def paginate(
    keys: list[torch.Tensor], values: list[torch.Tensor], group_tokens: int, shuffle: torch.Generator | None = None
) -> PagedKV:
    """Per-sequence keys/values (H_kv, T_b, D) -> one pool; slots shuffled if a generator is given
    (so tests do not pass by reading a contiguous range by accident)."""
    g = group_tokens
    counts = [-(-k.shape[1] // g) for k in keys]
    h, _, d = keys[0].shape
    total, n_max = sum(counts), max(counts)
    pool = torch.zeros(total, 2, h, g, d, dtype=keys[0].dtype, device=keys[0].device)
    order = torch.randperm(total, generator=shuffle) if shuffle is not None else torch.arange(total)
    table = torch.zeros(len(keys), n_max, dtype=torch.int64)
    start = 0
    for b, (k, v) in enumerate(zip(keys, values)):
        t, n = k.shape[1], counts[b]
        slots = order[start : start + n]
        table[b, :n] = slots
        pad = n * g - t
        kp = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(h, n, g, d).transpose(0, 1)  # (n, H_kv, G, D)
        vp = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(h, n, g, d).transpose(0, 1)
        pool[slots.to(pool.device), 0] = kp
        pool[slots.to(pool.device), 1] = vp
        start += n
    lens = torch.tensor([k.shape[1] for k in keys])
    last = (lens - (torch.tensor(counts) - 1) * g).to(torch.int32)
    dev = keys[0].device
    return PagedKV(pool, table.to(dev), torch.tensor(counts, device=dev), last.to(dev))


def to_slots(group_idx: torch.Tensor, slot_table: torch.Tensor) -> torch.Tensor:
    """group_idx (B, H_kv, P) -> int32 slots (B, H_kv, P) through slot_table (B, N_max)."""
    b, h, p = group_idx.shape
    flat = slot_table.gather(1, group_idx.long().reshape(b, h * p))  # (B, H_kv*P)
    return flat.view(b, h, p).to(torch.int32)


def all_pages(paged: PagedKV, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Page table selecting every group of every sequence: (B, H_kv, N_max) int32, num_pages (B,) int32."""
    b, n = paged.slot_table.shape
    idx = torch.arange(n, device=paged.slot_table.device).expand(b, num_kv_heads, n)
    return to_slots(idx, paged.slot_table), paged.num_groups.to(torch.int32)


def leading(counts: torch.Tensor, width: int) -> torch.Tensor:
    """(B,) counts -> (B, width) bool: the first ``counts[b]`` entries of row b (the groups a
    summary table holds, the pages a selection lists)."""
    return torch.arange(width, device=counts.device)[None, :] < counts[:, None]
