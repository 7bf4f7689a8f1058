"""Triton body of the fetch's dequantizer: stored rows (fp8, int8 or int4 bytes) -> typed groups.

``dst[dst_idx[r]]`` (2, H, G, D) = dequantize(``src[src_idx[r]]``). The source may be pinned
host memory read through unified addressing (the compressed bytes cross PCIe once and are
written as the model dtype straight into the destination: no staging copy, no extra pass
over GPU memory). Programs loop over the (row, K|V, heads, tokens) tiles: one tile
each, or a fixed number of programs that then hold only that many SMs. fp8 codes are decoded
with integer arithmetic (bit-exact, and the CPU interpreter needs no fp8 support). With
``HAS_RAW``, a source index at or past ``raw_from`` names a typed row of a second source,
copied as it is (masked loads: a program reads one source or the other). The
launcher (checks, grid) and its torch twin are ``kvdrive.quant.dequant``.
"""

import triton
import triton.language as tl


@triton.jit
def _fp8_e4m3(b):
    """uint8 codes of float8_e4m3fn -> fp32 (NaN codes are never written)."""
    b = b.to(tl.int32)
    sign = (b >> 7) << 31
    exp = (b >> 3) & 15
    mant = b & 7
    normal = (sign | ((exp + 120) << 23) | (mant << 20)).to(tl.float32, bitcast=True)
    sub = mant.to(tl.float32) * 0.001953125  # 2**-9: exponent 0 holds mant/8 * 2**-6
    sub = tl.where(sign != 0, -sub, sub)
    return tl.where(exp == 0, sub, normal)


@triton.jit
def dequant_rows_kernel(
    src_ptr,
    src_idx_ptr,
    src_stride,
    dst_ptr,
    dst_idx_ptr,
    dst_stride,
    raw_ptr,
    raw_stride,
    raw_from,
    H,
    G,
    D,
    vq_off,
    ks_off,
    kz_off,
    vs_off,
    vz_off,
    n_tiles,
    programs,
    live_ptr,
    INT4: tl.constexpr,
    INT8: tl.constexpr,
    HAS_RAW: tl.constexpr,
    LIVE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """src: uint8 rows; dst: typed rows (model dtype). Rows with ``dst_idx[r] < 0`` are skipped.
    ``BLOCK_D`` covers the codes' columns of one byte row: D (fp8, int8) or D/2 (int4).
    A tile is (K or V) x ``BLOCK_H`` heads x ``BLOCK_G`` tokens x the columns: large tiles keep a
    row's tile count low (a looping program pays each tile's index loads, even on a skipped row).
    ``programs`` programs loop over the ``n_tiles`` (row, K|V, heads, tokens) tiles: as many
    programs as tiles is one tile each; fewer hold only that many SMs and leave the rest to
    compute running beside the fetch (another micro-batch's layers). With ``LIVE``, only the
    first ``live_ptr[0]`` rows are read (a compacted miss list). A while loop: the CPU
    interpreter cannot range() over runtime bounds."""
    tiles_g = tl.cdiv(G, BLOCK_G)
    half = tl.cdiv(H, BLOCK_H) * tiles_g  # tiles of K (then as many of V) per row
    if LIVE:
        n_tiles = tl.load(live_ptr).to(tl.int32) * 2 * half
    i = tl.program_id(0)
    while i < n_tiles:
        row = i // (2 * half)
        j = i % (2 * half)
        d = tl.load(dst_idx_ptr + row).to(tl.int64)
        s = tl.load(src_idx_ptr + row).to(tl.int64)
        is_v = j >= half
        h = ((j % half) // tiles_g) * BLOCK_H + tl.arange(0, BLOCK_H)  # (BH,) heads
        t = (j % tiles_g) * BLOCK_G + tl.arange(0, BLOCK_G)  # (BG,) tokens of the group
        c = tl.arange(0, BLOCK_D)  # (BD,) byte columns
        cols = D // 2 if INT4 else D
        h3, t3, c3 = h[:, None, None], t[None, :, None], c[None, None, :]
        live = d >= 0  # the row is written from the stored source
        mask = (h3 < H) & (t3 < G) & (c3 < cols) & live
        at = (tl.where(is_v, H, 0) + h3) * G * D + t3 * D + c3  # (BH, BG, BD) in a typed row
        if HAS_RAW:  # an open group: a typed row of the raw source, copied
            use_raw = s >= raw_from
            raw = raw_ptr + tl.where(use_raw, s - raw_from, 0) * raw_stride + at
            raw_mask = mask & use_raw
            mask = mask & ~use_raw
            live = live & ~use_raw
            s = tl.where(use_raw, 0, s)
        src = src_ptr + s * src_stride
        q_at = tl.where(is_v, vq_off, 0) + (h3 * G + t3) * cols + c3
        b = tl.load(src + q_at, mask=mask, other=0)  # (BH, BG, BD) uint8
        # keys: per channel (H, D); values: per token (H, G); fp16 sections
        kcol = h[:, None] * D + c[None, :]  # (BH, BD)
        kmask = (h[:, None] < H) & (c[None, :] < cols) & ~is_v & live
        vtok = h[:, None] * G + t[None, :]  # (BH, BG)
        vmask = (h[:, None] < H) & (t[None, :] < G) & is_v & live
        scales16 = (src + ks_off).to(tl.pointer_type(tl.float16))
        vscales16 = (src + vs_off).to(tl.pointer_type(tl.float16))
        kz16 = (src + kz_off).to(tl.pointer_type(tl.float16))
        vs = tl.load(vscales16 + vtok, mask=vmask, other=0.0).to(tl.float32)[:, :, None]
        out = dst_ptr + d * dst_stride + at
        ty = dst_ptr.dtype.element_ty
        if INT4:
            vz16 = (src + vz_off).to(tl.pointer_type(tl.float16))
            cut = D // 2
            lo_k = tl.load(scales16 + kcol, mask=kmask, other=0.0).to(tl.float32)[:, None, :]
            hi_k = tl.load(scales16 + kcol + cut, mask=kmask, other=0.0).to(tl.float32)[:, None, :]
            lo_kz = tl.load(kz16 + kcol, mask=kmask, other=0.0).to(tl.float32)[:, None, :]
            hi_kz = tl.load(kz16 + kcol + cut, mask=kmask, other=0.0).to(tl.float32)[:, None, :]
            vz = tl.load(vz16 + vtok, mask=vmask, other=0.0).to(tl.float32)[:, :, None]
            b = b.to(tl.int32)
            lo = (b & 15).to(tl.float32)
            hi = (b >> 4).to(tl.float32)
            tl.store(out, (lo * tl.where(is_v, vs, lo_k) + tl.where(is_v, vz, lo_kz)).to(ty), mask=mask)
            tl.store(out + cut, (hi * tl.where(is_v, vs, hi_k) + tl.where(is_v, vz, hi_kz)).to(ty), mask=mask)
            if HAS_RAW:
                tl.store(out, tl.load(raw, mask=raw_mask, other=0.0).to(ty), mask=raw_mask)
                tl.store(out + cut, tl.load(raw + cut, mask=raw_mask, other=0.0).to(ty), mask=raw_mask)
        else:  # fp8 and int8: keys offset per channel (kz: centre, minimum), values not
            ks = tl.load(scales16 + kcol, mask=kmask, other=0.0).to(tl.float32)[:, None, :]
            kz = tl.load(kz16 + kcol, mask=kmask, other=0.0).to(tl.float32)[:, None, :]
            if INT8:  # keys: unsigned codes; values: two's complement bytes
                bi = b.to(tl.int32)
                x = tl.where(is_v, (bi ^ 128) - 128, bi).to(tl.float32)
            else:
                x = _fp8_e4m3(b)
            tl.store(out, (x * tl.where(is_v, vs, ks) + tl.where(is_v, 0.0, kz)).to(ty), mask=mask)
            if HAS_RAW:
                tl.store(out, tl.load(raw, mask=raw_mask, other=0.0).to(ty), mask=raw_mask)
        i += programs
