"""How far a sparse configuration's predictions are from full attention's, in pure torch.

Inputs are the logits of the same teacher-forced tokens under the reference (full
attention) and under the configuration tested: ``(..., V)`` tensors of equal shape, plus
the ``(...)`` next-token targets. Everything is computed in float32 on the inputs' device
and returned as floats in typed results; per-token tensors are available for a harness
that pools tokens across samples itself. Units: nats unless the name says bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

LN2 = math.log(2.0)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (..., V) float32 log-probabilities."""
    return torch.log_softmax(logits.float(), dim=-1)


def kl_per_token(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || test) of each position's next-token distribution, (...) nats, >= 0."""
    if ref_logits.shape != test_logits.shape:
        raise ValueError(f"logits shapes differ: {tuple(ref_logits.shape)} vs {tuple(test_logits.shape)}")
    ref, test = log_probs(ref_logits), log_probs(test_logits)
    # NOTE: xlogy-style: a zero-probability reference token contributes 0 even where test is -inf.
    kl = torch.where(ref > -math.inf, ref.exp() * (ref - test), torch.zeros_like(ref)).sum(-1)
    return kl.clamp_min(0.0)  # rounding can leave -1e-9 for identical inputs


def top1_agree(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """(...) bool: the two argmax tokens agree."""
    return ref_logits.argmax(-1) == test_logits.argmax(-1)


def nll_per_token(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(...) nats: -log p(target) under ``logits`` (..., V)."""
    return -log_probs(logits).gather(-1, targets.long()[..., None])[..., 0]


def perplexity(mean_nll: float) -> float:
    return math.exp(mean_nll)


def bits_per_byte(total_nll: float, n_bytes: int) -> float:
    """Total nats over the UTF-8 bytes of the predicted text -> bits per byte (tokenizer-free)."""
    if n_bytes <= 0:
        raise ValueError("bits per byte needs the predicted text's byte count (> 0)")
    return total_nll / LN2 / n_bytes


@dataclass(frozen=True)
class Comparison:
    """Test configuration vs reference over ``tokens`` teacher-forced positions."""

    tokens: int
    kl: float  # mean KL(ref || test), nats per token
    kl_max: float  # worst single position
    top1_agreement: float
    nll_ref: float  # mean nats per token
    nll_test: float
    n_bytes: int | None = None  # UTF-8 bytes of the predicted tokens, for bits per byte

    @property
    def ppl_ref(self) -> float:
        return perplexity(self.nll_ref)

    @property
    def ppl_test(self) -> float:
        return perplexity(self.nll_test)

    @property
    def ppl_delta(self) -> float:
        return self.ppl_test - self.ppl_ref

    @property
    def bpb_ref(self) -> float | None:
        return None if not self.n_bytes else bits_per_byte(self.nll_ref * self.tokens, self.n_bytes)

    @property
    def bpb_test(self) -> float | None:
        return None if not self.n_bytes else bits_per_byte(self.nll_test * self.tokens, self.n_bytes)

    def to_dict(self) -> dict:
        """Fields and derived values, for JSON."""
        return {
            **asdict(self),
            "ppl_ref": self.ppl_ref,
            "ppl_test": self.ppl_test,
            "ppl_delta": self.ppl_delta,
            "bpb_ref": self.bpb_ref,
            "bpb_test": self.bpb_test,
        }


def compare_logits(
    ref_logits: torch.Tensor, test_logits: torch.Tensor, targets: torch.Tensor, n_bytes: int | None = None
) -> Comparison:
    """Compare (..., V) logits of the same positions; ``targets`` (...) are the next tokens."""
    if targets.shape != ref_logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(ref_logits.shape)}")
    if targets.numel() == 0:
        raise ValueError("no positions to compare")
    kl = kl_per_token(ref_logits, test_logits)
    return Comparison(
        tokens=targets.numel(),
        kl=float(kl.mean()),
        kl_max=float(kl.max()),
        top1_agreement=float(top1_agree(ref_logits, test_logits).float().mean()),
        nll_ref=float(nll_per_token(ref_logits, targets).mean()),
        nll_test=float(nll_per_token(test_logits, targets).mean()),
        n_bytes=n_bytes,
    )


def pool(parts: Sequence[Comparison]) -> Comparison:
    """Token-weighted pooling of comparisons over disjoint positions (samples, chunks).
    Bytes pool only when every part has them."""
    if not parts:
        raise ValueError("nothing to pool")
    n = sum(p.tokens for p in parts)

    def mean(field: str) -> float:
        return sum(getattr(p, field) * p.tokens for p in parts) / n

    n_bytes = None if any(p.n_bytes is None for p in parts) else sum(p.n_bytes for p in parts)
    return Comparison(
        n, mean("kl"), max(p.kl_max for p in parts), mean("top1_agreement"), mean("nll_ref"), mean("nll_test"), n_bytes
    )
