"""KV storage formats: how a group (2, H_kv, G, D) is kept in host memory, on disk and in the
prefix pool.

* ``bf16``: the model's own dtype, as the GPU holds it (no scales);
* ``fp8``: float8_e4m3fn payload; keys centred and scaled per channel over the group's G
  tokens (``kz``, the midpoint of the channel's range, and ``ks`` (H_kv, D): a key channel's
  bias is kept exactly, so e4m3's relative error falls on its spread only), values scaled
  per token over D channels (``vs`` (H_kv, G)); fp16 scales and centres;
* ``int8``: fp8's bytes and sections, integer codes: keys asymmetric per channel over the
  group's G tokens (``ks`` the step, ``kz`` the minimum: 256 even levels across the channel's
  range, where e4m3 keeps 3 mantissa bits of each value), values symmetric per token over D
  (``vs``; codes -127..127 as two's complement bytes);
* ``int4``: KIVI's asymmetric 4-bit: keys per channel over the group's G tokens (scale and
  zero (H_kv, D)), values per token over D channels (scale and zero (H_kv, G)); two codes
  per byte, code ``c`` of a row in the low nibble of byte ``c`` and code ``c + D/2`` in its
  high nibble (halves, not neighbours: the dequantizer writes two contiguous half rows).

A stored group is one byte row: sections in the order of ``SECTIONS``, each starting on a
16-byte boundary. ``quantize`` (torch, on the groups' device) writes rows; ``dequantize``
is the torch twin of the Triton dequantizer (``kvdrive.quant.dequant``), both computing in
fp32 and rounding once to the output dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvdrive.errors import KvdriveError

KV_DTYPES = ("bf16", "fp8", "int8", "int4")
# Byte layout revision of each compressed format, part of its stored name (``stored_name``):
# a change to a format's bytes bumps it, so stored groups of the old layout are never read as
# the new (prefix keys and pool geometries carry the name). fp8 2: keys centred per channel.
REVISIONS = {"fp8": 2, "int8": 1, "int4": 1}
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT4_LEVELS = 15
INT8_KEY_LEVELS, INT8_VALUE_MAX = 255, 127
_SECTION_ALIGN = 16
# fp16 scales: the smallest positive subnormal and the largest finite value.
_SCALE_MIN, _SCALE_MAX = 2.0**-24, 65504.0
SECTIONS = {
    "fp8": ("kq", "vq", "ks", "kz", "vs"),
    "int8": ("kq", "vq", "ks", "kz", "vs"),
    "int4": ("kq", "vq", "ks", "kz", "vs", "vz"),
}


class Section(NamedTuple):
    offset: int  # bytes from the row's start
    nbytes: int


def check_kv_dtype(name: str) -> str:
    """``name`` if it is a storage format, else a ``KvdriveError`` naming the ones there are."""
    if name not in KV_DTYPES:
        raise KvdriveError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}; got {name!r}")
    return name


def stored_name(kv_dtype: str) -> str:
    """The format as stored data names it: "" for the model dtype, else name and revision
    (``fp8r2``)."""
    return "" if check_kv_dtype(kv_dtype) == "bf16" else f"{kv_dtype}r{REVISIONS[kv_dtype]}"


def sections(kv_dtype: str, heads: int, tokens: int, dim: int) -> dict[str, Section]:
    """Byte sections of one stored group of ``heads`` x ``tokens`` x ``dim`` (K and V)."""
    check_kv_dtype(kv_dtype)
    if kv_dtype == "bf16":
        raise KvdriveError("bf16 groups are stored as the typed group; they have no sections")
    if kv_dtype == "int4" and dim % 2:
        raise KvdriveError(f"int4 KV needs an even head_dim, got {dim}")
    payload = heads * tokens * (dim // 2 if kv_dtype == "int4" else dim)
    sizes = {"kq": payload, "vq": payload, "ks": 2 * heads * dim, "kz": 2 * heads * dim}
    sizes.update(vs=2 * heads * tokens, vz=2 * heads * tokens)
    out, at = {}, 0
    for name in SECTIONS[kv_dtype]:
        out[name] = Section(at, sizes[name])
        at += -(-sizes[name] // _SECTION_ALIGN) * _SECTION_ALIGN
    return out


def stored_bytes(kv_dtype: str, heads: int, tokens: int, dim: int, itemsize: int) -> int:
    """Bytes of one stored group (before slot alignment); ``itemsize``: the model dtype's."""
    if check_kv_dtype(kv_dtype) == "bf16":
        return 2 * heads * tokens * dim * itemsize
    last = list(sections(kv_dtype, heads, tokens, dim).values())[-1]
    return -(-(last.offset + last.nbytes) // _SECTION_ALIGN) * _SECTION_ALIGN


def _scale(x: torch.Tensor) -> torch.Tensor:
    """A positive fp16 scale from an fp32 one (never 0: an all-zero span decodes to 0)."""
    return x.clamp(_SCALE_MIN, _SCALE_MAX).to(torch.float16)


def _centre(x: torch.Tensor) -> torch.Tensor:
    """An fp16 offset (a centre or a minimum), clamped to fp16's finite range."""
    return x.clamp(-_SCALE_MAX, _SCALE_MAX).to(torch.float16)


def quantize(groups: torch.Tensor, kv_dtype: str) -> torch.Tensor:
    """Typed groups (N, 2, H, G, D) -> stored rows (N, stored_bytes) uint8 on the same device."""
    n, two, h, g, d = groups.shape
    if two != 2:
        raise ValueError(f"expected groups (N, 2, H, G, D), got {tuple(groups.shape)}")
    if check_kv_dtype(kv_dtype) == "bf16":
        return groups.contiguous().view(n, -1).view(torch.uint8)
    sec = sections(kv_dtype, h, g, d)
    out = torch.zeros(
        n, stored_bytes(kv_dtype, h, g, d, groups.dtype.itemsize), dtype=torch.uint8, device=groups.device
    )
    k, v = groups[:, 0].float(), groups[:, 1].float()  # (N, H, G, D)
    if kv_dtype == "fp8":
        kz = _centre((k.amax(dim=2) + k.amin(dim=2)) / 2)  # (N, H, D): per channel over the group's tokens
        kc = k - kz.float()[:, :, None, :]
        ks = _scale(kc.abs().amax(dim=2) / FP8_MAX)  # (N, H, D)
        vs = _scale(v.abs().amax(dim=3) / FP8_MAX)  # (N, H, G): per token over the channels
        kq = (kc / ks.float()[:, :, None, :]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        vq = (v / vs.float()[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        parts = {"kq": kq.view(torch.uint8), "vq": vq.view(torch.uint8), "ks": ks, "kz": kz, "vs": vs}
    elif kv_dtype == "int8":
        klo, khi = k.amin(dim=2), k.amax(dim=2)  # (N, H, D)
        ks, kz = _scale((khi - klo) / INT8_KEY_LEVELS), _centre(klo)
        vs = _scale(v.abs().amax(dim=3) / INT8_VALUE_MAX)  # (N, H, G)
        kq = ((k - kz.float()[:, :, None, :]) / ks.float()[:, :, None, :]).round().clamp(0, INT8_KEY_LEVELS)
        vq = (v / vs.float()[..., None]).round().clamp(-INT8_VALUE_MAX, INT8_VALUE_MAX)
        parts = {"kq": kq.to(torch.uint8), "vq": vq.to(torch.int8).view(torch.uint8), "ks": ks, "kz": kz, "vs": vs}
    else:
        klo, khi = k.amin(dim=2), k.amax(dim=2)  # (N, H, D)
        vlo, vhi = v.amin(dim=3), v.amax(dim=3)  # (N, H, G)
        ks, kz = _scale((khi - klo) / INT4_LEVELS), _centre(klo)
        vs, vz = _scale((vhi - vlo) / INT4_LEVELS), _centre(vlo)
        kq = ((k - kz.float()[:, :, None, :]) / ks.float()[:, :, None, :]).round().clamp(0, INT4_LEVELS)
        vq = ((v - vz.float()[..., None]) / vs.float()[..., None]).round().clamp(0, INT4_LEVELS)
        parts = {"kq": _pack4(kq), "vq": _pack4(vq), "ks": ks, "kz": kz, "vs": vs, "vz": vz}
    for name, (at, nbytes) in sec.items():
        out[:, at : at + nbytes] = parts[name].reshape(n, -1).view(torch.uint8)
    return out


def dequantize(rows: torch.Tensor, kv_dtype: str, shape: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """Stored rows (N, >= stored_bytes) uint8 -> typed groups (N, 2, H, G, D) of ``dtype``;
    ``shape`` is (H, G, D). The torch twin of ``kvdrive.quant.dequant.dequant_rows``."""
    h, g, d = shape
    n = rows.shape[0]
    if check_kv_dtype(kv_dtype) == "bf16":
        return rows[:, : 2 * h * g * d * dtype.itemsize].contiguous().view(dtype).view(n, 2, h, g, d)
    sec = sections(kv_dtype, h, g, d)

    def part(name: str, view: torch.dtype, *dims: int) -> torch.Tensor:
        at, nbytes = sec[name]
        return rows[:, at : at + nbytes].contiguous().view(view).view(n, *dims)

    ks, vs = part("ks", torch.float16, h, d).float(), part("vs", torch.float16, h, g).float()
    kz = part("kz", torch.float16, h, d).float()
    if kv_dtype == "fp8":
        kq = part("kq", torch.float8_e4m3fn, h, g, d).float()
        vq = part("vq", torch.float8_e4m3fn, h, g, d).float()
        k, v = kq * ks[:, :, None, :] + kz[:, :, None, :], vq * vs[..., None]
    elif kv_dtype == "int8":
        kq = part("kq", torch.uint8, h, g, d).float()
        vq = part("vq", torch.int8, h, g, d).float()
        k, v = kq * ks[:, :, None, :] + kz[:, :, None, :], vq * vs[..., None]
    else:
        vz = part("vz", torch.float16, h, g).float()
        kq, vq = _unpack4(part("kq", torch.uint8, h, g, d // 2)), _unpack4(part("vq", torch.uint8, h, g, d // 2))
        k, v = kq * ks[:, :, None, :] + kz[:, :, None, :], vq * vs[..., None] + vz[..., None]
    return torch.stack([k, v], dim=1).to(dtype)  # (N, 2, H, G, D)


def _pack4(q: torch.Tensor) -> torch.Tensor:
    """Codes (..., D) in 0..15 -> bytes (..., D/2): low nibble column c, high nibble c + D/2."""
    q = q.to(torch.uint8)
    half = q.shape[-1] // 2
    return q[..., :half] | (q[..., half:] << 4)


def _unpack4(b: torch.Tensor) -> torch.Tensor:
    """Bytes (..., D/2) -> codes (..., D) as fp32."""
    return torch.cat([b & 15, b >> 4], dim=-1).float()
