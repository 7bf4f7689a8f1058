"""Index-driven copies of the tiered cache, each with a pure-torch twin.

* ``fetch_rows``: groups from a source pool (pinned host) into a destination pool (GPU)
  at rows given by device tensors; a negative destination skips the row.
* ``write_tokens``: new tokens' K and V into their groups of a pool (the host copy of
  every group is written as the token is produced).

``impl``: ``triton`` runs the kernels of ``tier_kernels`` (CUDA, or CPU under
``TRITON_INTERPRET=1``); ``torch`` the reference (CPU, or GPU pools); ``auto`` picks
triton when a pool is pinned host memory seen from CUDA, where torch cannot index.
"""

from __future__ import annotations

import torch

from kvdrive.device import triton_available

IMPLS = ("auto", "triton", "torch")
FETCH_BLOCK = 2048  # int32 words per program


def _impl(impl: str, *tensors) -> str:
    if impl != "auto":
        return impl
    devices = {t.device.type for t in tensors}
    return "triton" if devices == {"cuda", "cpu"} else "torch"


def words(rows: torch.Tensor) -> torch.Tensor:
    """A pool as int32 word rows (R, row_words): typed (R, 2, H_kv, G, D) contiguous, or byte rows
    (R, row_bytes) uint8 (the host arena, whose rows are padded to 4 KiB)."""
    return rows.view(rows.shape[0], -1).view(torch.int32)


def fetch_rows(src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor, n_words: int,
               impl: str = "auto", programs: int = 0) -> None:
    """``dst[dst_idx[r], :n_words] = src[src_idx[r], :n_words]`` on int32 word rows (see ``words``);
    src_idx, dst_idx (M,) int64 on the destination's device; ``dst_idx[r] < 0`` skips row r.
    ``programs``: 0 launches a program per (row, block); N > 0 that many looping programs
    (the copy then occupies at most N SMs)."""
    if _impl(impl, src, dst) == "torch":
        keep = dst_idx >= 0
        rows = src[src_idx[keep].to(src.device), :n_words]
        dst[dst_idx[keep].to(dst.device), :n_words] = rows.to(dst.device)
        return
    import triton

    from kvdrive.kv.tier_kernels import fetch_rows_kernel, fetch_rows_persistent_kernel

    if src_idx.numel() == 0:
        return
    grid = (src_idx.numel(), triton.cdiv(n_words, FETCH_BLOCK))
    if programs > 0:
        n_tiles = grid[0] * grid[1]
        programs = min(programs, n_tiles)
        fetch_rows_persistent_kernel[(programs,)](src, src_idx, src.stride(0), dst, dst_idx, dst.stride(0), n_words,
                                                  n_tiles, grid[1], programs, BLOCK=FETCH_BLOCK)
        return
    fetch_rows_kernel[grid](src, src_idx, src.stride(0), dst, dst_idx, dst.stride(0), n_words, BLOCK=FETCH_BLOCK)


def write_tokens(pool: torch.Tensor, rows: torch.Tensor, offs: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 impl: str = "auto") -> None:
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

    from kvdrive.kv.tier_kernels import write_tokens_kernel

    b, h, t, d = k.shape
    g = pool.shape[3]
    k = k if k.stride(-1) == 1 else k.contiguous()  # the projections' strided views need no copy
    v = v if v.stride(-1) == 1 else v.contiguous()
    write_tokens_kernel[(b * t, h)](k, v, pool, pool.stride(0), rows.contiguous(), offs.contiguous(), t, h, g,
                                    *k.stride()[:3], *v.stride()[:3], D=d, BLOCK_D=triton.next_power_of_2(d))
