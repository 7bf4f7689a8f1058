"""Building blocks shared by the decoders: norms and the gated MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvdrive.device import use_triton


class RMSNorm(nn.Module):
    """RMSNorm; ``offset=1`` gives Gemma's ``x * (1 + w)`` (computed in float32 throughout),
    ``offset=0`` Llama's ``w * x`` (normalised in float32, scaled in the input dtype)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """``impl``: 'auto' runs the Triton kernel on CUDA, 'triton' forces it (the interpreter
        tests), 'torch' the reference below."""
        if use_triton(impl, x) and (impl == "triton" or self.weight.dtype == x.dtype):
            return _rmsnorm_triton(x, self.weight, self.eps, self.offset)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + self.weight.float())).type_as(x)
        return self.weight * normed.to(x.dtype)


def _rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    import triton

    from kvdrive.models.norm_triton import rmsnorm_kernel

    n = x.shape[-1]
    xc = x.contiguous()
    out = torch.empty_like(xc)
    rows = xc.numel() // n if n else 0
    if rows:
        block = triton.next_power_of_2(n)
        rmsnorm_kernel[(rows,)](
            xc,
            weight.contiguous(),
            out,
            n,
            eps,
            OFFSET=float(offset),
            BLOCK=block,
            num_warps=max(1, min(16, block // 256)),
        )
    return out


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def fuse_linears(*mods: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (sum of outputs, in) weight (and bias) for linears of one input; each module's
    parameters become views of it, so no memory is added and state dicts keep their names.
    The caller keeps the result as buffers (``.to()`` then moves them with the parameters)."""
    weight = torch.cat([m.weight.detach() for m in mods])
    bias = torch.cat([m.bias.detach() for m in mods]) if mods[0].bias is not None else None
    start = 0
    for m in mods:
        rows = m.weight.shape[0]
        m.weight = nn.Parameter(weight[start : start + rows], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    return weight, bias


def act_mul(gate_up: torch.Tensor, act: str, impl: str = "auto") -> torch.Tensor:
    """(..., 2I) [gate | up] -> act(gate) * up (..., I). ``impl``: 'auto' runs one Triton launch
    for SiLU on CUDA (``act_triton.py``), 'triton' forces it, 'torch' the reference."""
    inner = gate_up.shape[-1] // 2
    if use_triton(impl, gate_up) and act == "silu" and gate_up.is_contiguous():
        return _silu_mul_triton(gate_up, inner)
    gate, up = gate_up.split(inner, dim=-1)
    return ACTIVATIONS[act](gate) * up


def _silu_mul_triton(gate_up: torch.Tensor, inner: int) -> torch.Tensor:
    import triton

    from kvdrive.models.act_triton import silu_mul_kernel

    out = torch.empty(*gate_up.shape[:-1], inner, dtype=gate_up.dtype, device=gate_up.device)
    rows = out.numel() // inner if inner else 0
    if rows:
        block = min(2048, triton.next_power_of_2(inner))
        silu_mul_kernel[(rows, triton.cdiv(inner, block))](gate_up, out, inner, BLOCK=block)
    return out


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inner: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.act_name = act
        self.act = ACTIVATIONS[act]
        self.fused = False  # fuse(): gate and up as one GEMM (buffer gate_up_weight)

    def fuse(self) -> None:
        """One (2I, hidden) weight for gate and up; their parameters become views of it (no
        extra memory; state dicts keep Hugging Face's names). One GEMM and one activation
        launch instead of two GEMMs, the activation and the product."""
        weight, _ = fuse_linears(self.gate_proj, self.up_proj)
        self.register_buffer("gate_up_weight", weight, persistent=False)  # not persistent: not in state dicts
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.down_proj(act_mul(F.linear(x, self.gate_up_weight), self.act_name))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
