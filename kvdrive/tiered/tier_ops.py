"""Index-driven writes of the tiered cache, each with a pure-torch twin (the row copy
between pools is ``kvdrive.storage.gather.copy_rows``).

* ``write_tokens``: new tokens' K and V into their groups of a pool (the host copy of
  every group is written as the token is produced).
* ``append_token``: a decode token's K and V into its host row and the GPU cache's copy of
  its open group, in one launch.
* ``defer_split``: a deferred-miss step's selection split into what is served now and what
  is left out, in one launch.

``impl``: ``triton`` runs the kernels of ``tier_ops_triton`` (CUDA, or CPU under
``TRITON_INTERPRET=1``); ``torch`` the reference (CPU, or GPU pools); ``auto`` picks
triton when a pool is pinned host memory seen from CUDA, where torch cannot index.
"""

from __future__ import annotations

import torch

from kvdrive.device import triton_available

IMPLS = ("auto", "triton", "torch")


def _impl(impl: str, *tensors) -> str:
    if impl != "auto":
        return impl
    devices = {t.device.type for t in tensors}
    return "triton" if devices == {"cuda", "cpu"} else "torch"


def write_tokens(
    pool: torch.Tensor, rows: torch.Tensor, offs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto"
) -> None:
    """pool (R, 2, H, G, D), rows may be padded (a strided view); rows, offs (B, T) int64 on k's device; k, v (B, H, T, D).

    ``auto`` also runs the kernel for a GPU pool written from CUDA: one launch, where torch's two
    index_puts (with their index arithmetic and copies of the strided k/v) are ~10.
    """
    if impl == "auto" and k.is_cuda and pool.is_cuda and pool[0].is_contiguous() and triton_available():
        impl = "triton"
    if _impl(impl, pool, k) == "torch":
        r, o = rows.to(pool.device), offs.to(pool.device)
        pool[r, 0, :, o] = k.transpose(1, 2).to(pool.device)  # (B, T, H, D)
        pool[r, 1, :, o] = v.transpose(1, 2).to(pool.device)
        return
    import triton

    from kvdrive.tiered.tier_ops_triton import write_tokens_kernel

    b, h, t, d = k.shape
    g = pool.shape[3]
    k = k if k.stride(-1) == 1 else k.contiguous()  # the projections' strided views need no copy
    v = v if v.stride(-1) == 1 else v.contiguous()
    write_tokens_kernel[(b * t, h)](
        k,
        v,
        pool,
        pool.stride(0),
        rows.contiguous(),
        offs.contiguous(),
        t,
        h,
        g,
        *k.stride()[:3],
        *v.stride()[:3],
        D=d,
        BLOCK_D=triton.next_power_of_2(d),
    )


def append_token(
    host: torch.Tensor,
    host_rows: torch.Tensor,
    offs: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache=None,
    slots: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    impl: str = "auto",
) -> None:
    """One decode token per sequence: k, v (B, H, 1, D) at offset ``offs`` (B,) of host pool row
    ``host_rows`` (B,); with ``cache`` (a ``SelectionCache``), also into its copy of group
    ``groups`` (B,) of sequence slot ``slots`` (B,) where cached (its trash row otherwise).

    NOTE: per layer and micro-batch of the decode, this is one launch where the two
    ``write_tokens`` with their index arithmetic and the cache lookup are ~12 kernels on the
    serial chain before the next fetch.
    """
    if impl == "auto":
        impl = (
            "triton"
            if k.is_cuda and (cache is None or cache.pool[0].is_contiguous()) and triton_available()
            else "torch"
        )
    if impl == "torch":
        write_tokens(host, host_rows[:, None], offs[:, None], k, v)
        if cache is not None:
            write_tokens(cache.pool, cache.lookup(slots, groups[:, None]), offs[:, None], k, v, impl="torch")
        return
    import triton

    from kvdrive.tiered.tier_ops_triton import append_token_kernel

    b, h, t, d = k.shape
    if t != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"append_token takes one token per sequence with unit stride in D, got k {tuple(k.shape)}")
    g = host.shape[3]
    c = cache.pool if cache is not None else host  # unread without a cache
    table = cache.table if cache is not None else host_rows
    append_token_kernel[(b, h)](
        k,
        v,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        offs.contiguous(),
        host,
        host.stride(0),
        host_rows.contiguous(),
        c,
        c.stride(0),
        table,
        table.stride(0),
        slots if slots is not None else host_rows,
        groups if groups is not None else host_rows,
        cache.capacity if cache is not None else 0,
        cache.trash if cache is not None else 0,
        h,
        g,
        HAS_CACHE=cache is not None,
        D=d,
        BLOCK_D=triton.next_power_of_2(d),
    )


def defer_split(
    groups: torch.Tensor,
    num_pages: torch.Tensor,
    slots: torch.Tensor,
    host_map: torch.Tensor,
    cache_table: torch.Tensor,
    impl: str = "auto",
):
    """A selection of a deferred-miss step (``disk_misses="defer"``) split on the device:
    groups (B, P) integers (a strided view will do), the first ``num_pages`` (B,) of each row
    listed; slots (B,) int64 sequence slots; host_map (S, N) int64 the layer's arena row of
    each group (-1: on disk only); cache_table (S, N + 1) int32 the GPU cache's slot (-1: not
    cached). Returns (kept (B, P) int32, kept_pages (B,) int32, src (B, P) int64, flags (B, P)
    uint8): the listed groups the GPU cache or the arena holds, first in each row in their
    order, their count and arena rows (entries past ``kept_pages`` are unspecified); flags
    aligned with ``groups``, 1 listed, 2 listed but left out (on disk only and not cached).

    NOTE: one launch per layer and micro-batch where the torch twin is ~25 kernels (lookups,
    masks, a sort to compact, gathers): with the twin, a small model's deferred step is bound
    by kernel launches.
    """
    if impl == "auto":
        impl = "triton" if groups.is_cuda and triton_available() else "torch"
    b, p = groups.shape
    if impl == "torch":
        g = groups.long()
        listed = torch.arange(p, device=g.device)[None, :] < num_pages[:, None]
        src = host_map[slots[:, None], g]
        cached = cache_table[slots[:, None], g] >= 0
        left = listed & ~cached & (src < 0)
        flags = listed.to(torch.uint8) | (left.to(torch.uint8) << 1)
        order = torch.sort((~(listed & ~left)).to(torch.uint8), dim=1, stable=True).indices  # kept first, in order
        kept_pages = (listed & ~left).sum(1, dtype=torch.int32)
        return g.gather(1, order).to(torch.int32), kept_pages, src.gather(1, order), flags
    import triton

    from kvdrive.tiered.tier_ops_triton import defer_split_kernel

    kept = torch.empty(b, p, dtype=torch.int32, device=groups.device)
    src = torch.empty(b, p, dtype=torch.int64, device=groups.device)
    flags = torch.empty(b, p, dtype=torch.uint8, device=groups.device)
    kept_pages = torch.empty(b, dtype=torch.int32, device=groups.device)
    defer_split_kernel[(b,)](
        groups,
        groups.stride(0),
        groups.stride(1),
        num_pages,
        slots,
        host_map,
        host_map.stride(0),
        cache_table,
        cache_table.stride(0),
        kept,
        kept_pages,
        src,
        flags,
        p,
        BLOCK_P=triton.next_power_of_2(p),
    )
    return kept, kept_pages, src, flags
