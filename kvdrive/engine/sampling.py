"""Sampling parameters (validated at the edge) and the batched sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvdrive.errors import KvdriveError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens, in the shape vLLM users know.

    ``temperature=0`` is greedy. ``top_k`` 0 or -1 and ``top_p`` 1.0 disable those
    filters. ``seed`` makes sampling reproducible per request. Generation stops at
    ``max_tokens``, an end-of-sequence token (unless ``ignore_eos``), a token in
    ``stop_token_ids`` or when the text contains a string of ``stop`` (which is cut off).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise KvdriveError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise KvdriveError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise KvdriveError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise KvdriveError(f"top_k must be an integer >= 0 (0 or -1 = off), got {self.top_k!r}")
        if any(not s for s in self.stop):
            raise KvdriveError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits (V,) float32 -> temperature-scaled logits with top-k / top-p masked to -inf."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits (B, V) -> one token id per row."""
    if all(p.greedy for p in params):
        return logits.argmax(-1).tolist()
    out = []
    for row, p, gen in zip(logits, params, generators):
        if p.greedy:
            out.append(int(row.argmax()))
            continue
        probs = filter_logits(row.float(), p).softmax(-1)
        out.append(int(torch.multinomial(probs, 1, generator=gen)))
    return out
