"""The fetch's dequantizer: ``dst[dst_idx[r]] = dequantize(src[src_idx[r]])`` for stored rows.

``dequant_rows`` is ``copy_rows`` (``kvdrive.storage.gather``) for compressed formats: the
source rows hold a group in a storage format (``kvdrive.quant.formats``), the destination
rows hold typed groups (2, H, G, D) of the model dtype. ``impl``:

* ``triton``: one launch (``dequant_triton``); the source may be pinned host memory read in
  place through unified addressing, so compressed bytes cross PCIe and are widened on the
  way into the destination;
* ``torch``: the twin (``dequant_rows_reference``), on CPU and in tests.

``raw``: a second source of typed rows (the model dtype, as the destination) for source
indices at or past ``raw_from``: ``dst[dst_idx[r]] = raw[src_idx[r] - raw_from]``, copied as
they are. The tiered cache's fetch reads its sealed (compressed) groups and the open groups
(exact, written token by token) in one launch so.
"""

from __future__ import annotations

import torch

from kvdrive.device import triton_available
from kvdrive.quant.formats import check_kv_dtype, dequantize, sections
from kvdrive.rows import live_rows, row_args

MAX_TILE = 8192  # elements of one program's (heads x tokens x columns) tile: 4 heads of a 16 x 128 group


def dequant_rows_reference(
    src: torch.Tensor,
    src_idx: torch.Tensor,
    dst: torch.Tensor,
    dst_idx: torch.Tensor,
    kv_dtype: str,
    shape: tuple[int, int, int],
    raw: torch.Tensor | None = None,
    raw_from: int = 0,
) -> None:
    """The torch twin of ``dequant_rows`` (synchronous, across devices if need be)."""
    keep = dst_idx >= 0
    elems = 2 * shape[0] * shape[1] * shape[2]
    if raw is not None:
        from_raw = keep & (src_idx >= raw_from)
        keep = keep & ~from_raw
        r = (src_idx[from_raw] - raw_from).to(raw.device)
        dst[dst_idx[from_raw].to(dst.device), :elems] = raw[r, :elems].to(dst.device, dst.dtype)
    rows = src[src_idx[keep].to(src.device)]  # (n, row_bytes) uint8
    groups = dequantize(rows, kv_dtype, shape, dst.dtype)  # (n, 2, H, G, D)
    dst[dst_idx[keep].to(dst.device), :elems] = groups.reshape(groups.shape[0], elems).to(dst.device)


def dequant_rows(
    src: torch.Tensor,
    src_idx: torch.Tensor,
    dst: torch.Tensor,
    dst_idx: torch.Tensor,
    kv_dtype: str,
    shape: tuple[int, int, int],
    impl: str = "auto",
    raw: torch.Tensor | None = None,
    raw_from: int = 0,
    programs: int = 0,
    live: torch.Tensor | None = None,
) -> None:
    """``src`` (R, >= stored_bytes) uint8 rows with unit column stride; ``dst`` (S, >= 2*H*G*D)
    rows of the model dtype; ``src_idx``, ``dst_idx`` (M,) int64 where the kernel runs;
    ``dst_idx[r] < 0`` skips row r; ``shape`` (H, G, D). ``kv_dtype`` "bf16" is a plain row copy.
    ``raw`` (R2, >= 2*H*G*D) typed rows with unit column stride, of ``dst``'s dtype: the source of
    indices >= ``raw_from``. ``impl="auto"``: the kernel when the destination is on CUDA and
    Triton is there, else torch. ``programs``: 0 launches a program per (row, K|V, tile of heads x tokens);
    N > 0 that many looping programs (the fetch then occupies at most N SMs). ``live``: a (1,)
    int32 tensor on the indices' device; only the first ``live[0]`` rows are read (as
    ``copy_rows``)."""
    check_kv_dtype(kv_dtype)
    if impl == "auto":
        impl = "triton" if dst.device.type == "cuda" and triton_available() else "torch"
    if impl == "torch" or kv_dtype == "bf16":
        dequant_rows_reference(src, src_idx, dst, live_rows(dst_idx, live), kv_dtype, shape, raw, raw_from)
        return
    import triton

    from kvdrive.quant.dequant_triton import dequant_rows_kernel

    n = src_idx.numel()
    if n == 0:
        return
    h, g, d = shape
    sec = sections(kv_dtype, h, g, d)
    cols = d // 2 if kv_dtype == "int4" else d
    block_d = triton.next_power_of_2(cols)
    block_g = max(1, min(triton.next_power_of_2(g), MAX_TILE // block_d))
    block_h = max(1, min(triton.next_power_of_2(h), MAX_TILE // (block_g * block_d)))
    zero = sec["kz"].offset, sec.get("vz", sec["vs"]).offset  # fp8 has no value zero: unread
    n_tiles = n * 2 * triton.cdiv(h, block_h) * triton.cdiv(g, block_g)
    programs = programs if 0 < programs < n_tiles else n_tiles
    dequant_rows_kernel[(programs,)](
        *row_args(src, src_idx, dst, dst_idx),
        raw if raw is not None else dst,  # unread without a raw source
        raw.stride(0) if raw is not None else 0,
        raw_from,
        h,
        g,
        d,
        sec["vq"].offset,
        sec["ks"].offset,
        zero[0],
        sec["vs"].offset,
        zero[1],
        n_tiles,
        programs,
        live if live is not None else dst_idx,  # unread without a count
        INT4=kv_dtype == "int4",
        INT8=kv_dtype == "int8",
        HAS_RAW=raw is not None,
        LIVE=live is not None,
        BLOCK_H=block_h,
        BLOCK_G=block_g,
        BLOCK_D=block_d,
        num_warps=8 if block_h * block_g * block_d > 4096 else 4,
    )


def check_dequant(src: torch.Tensor, dst: torch.Tensor, stored: int, group_elems: int) -> None:
    """What the kernel assumes of its operands (``dequant_rows`` itself does not check)."""
    if src.dtype != torch.uint8 or src.dim() != 2 or src.stride(1) != 1 or src.shape[1] < stored:
        raise ValueError(f"src must be (R, >= {stored}) uint8 rows, got {src.dtype} {tuple(src.shape)}")
    if dst.dim() != 2 or dst.stride(1) != 1 or dst.shape[1] < group_elems:
        raise ValueError(f"dst must be (S, >= {group_elems}) typed rows, got {tuple(dst.shape)}")
