"""Sampling parameters (validated at the edge) and the batched sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvdrive.errors import KvdriveError

# A temperature below this samples greedily (as vLLM does): dividing logits by it overflows to inf.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens, in the shape vLLM users know.

    ``temperature=0`` (or below ``GREEDY_BELOW``) is greedy. ``top_k`` 0 or -1 and ``top_p`` 1.0 disable those
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
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise KvdriveError(f"stop is a string or a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise KvdriveError(f"stop_token_ids is a list of token ids >= 0, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise KvdriveError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            raise KvdriveError(
                f"temperature must be a finite number >= 0 (0 = greedy, e.g. 0.7), got {self.temperature!r}"
            )
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise KvdriveError(f"top_p must be a number in (0, 1] (e.g. 0.95), got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise KvdriveError(f"top_k must be an integer >= 0 (0 or -1 = off), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise KvdriveError(f"seed must be an integer in 0..2**64-1 (e.g. 1), got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise KvdriveError(f"ignore_eos is True or False, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


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
        drop[0] = False  # the most likely token always stays (a top_p below float32's smallest step drops none)
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
