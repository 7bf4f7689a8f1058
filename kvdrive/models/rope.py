"""Rotary position embeddings: inverse frequencies per ``RopeSpec`` and the rotation."""

from __future__ import annotations

import math

import torch

from kvdrive.config import RopeSpec
from kvdrive.device import use_triton


def inv_freq(spec: RopeSpec, head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """(head_dim // 2,) float32 inverse frequencies, following the HF definitions."""
    exps = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    freq = 1.0 / (spec.theta**exps)
    if spec.rope_type == "linear":
        return freq / spec.factor
    if spec.rope_type == "llama3":
        old = spec.original_max_position_embeddings
        low_wavelen = old / spec.low_freq_factor
        high_wavelen = old / spec.high_freq_factor
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > low_wavelen, freq / spec.factor, freq)
        smooth = (old / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
        smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return freq


def cos_sin(freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) -> cos, sin (B, 1, T, D), computed in float32 then cast."""
    angles = positions.float()[..., None] * freq  # (B, T, D/2)
    emb = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """x (B, H, T, D) rotated by position; cos, sin (B, 1, T, D). ``impl``: 'auto' runs the
    Triton kernel on CUDA (one launch instead of five), 'triton' forces it, 'torch' the reference."""
    d = x.shape[-1]
    if (
        use_triton(impl, x)
        and x.dim() == 4
        and x.stride(-1) == 1
        and d & (d - 1) == 0
        and cos.dtype == sin.dtype == x.dtype
    ):
        return _apply_triton(x, cos, sin)
    return x * cos + rotate_half(x) * sin


def _apply_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    from kvdrive.models.rope_triton import rope_kernel

    b, h, t, d = x.shape
    cos, sin = cos.expand(b, 1, t, d).contiguous(), sin.expand(b, 1, t, d).contiguous()
    out = torch.empty_like(x)  # the input's layout, as torch's elementwise ops give
    if out.numel():
        block_t = 16  # rows of one program (decode: one, masked)
        rope_kernel[(b * h, -(-t // block_t))](
            x,
            cos,
            sin,
            out,
            h,
            t,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            cos.stride(0),
            cos.stride(2),
            D=d,
            BLOCK_T=block_t,
        )
    return out
