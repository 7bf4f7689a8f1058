"""Rotary position embeddings: inverse frequencies per ``RopeSpec`` and the rotation."""

from __future__ import annotations

import math

import torch

from kvdrive.config import RopeSpec


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


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by position."""
    return x * cos + rotate_half(x) * sin
