"""A request's state through the engine, the event each of its tokens makes, and its text.

A ``Request`` is created by its submitter (``LLM``, the server) and then mutated only by
the engine thread: ``prefilled`` and ``cached_tokens`` while its prompt enters the cache,
``output_ids``, ``text`` and ``finish_reason`` as tokens are accepted. Once
``finish_reason`` is set the engine no longer holds it and its fields stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvdrive.engine.sampling import SamplingParams

FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass
class Request:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int  # max_tokens, capped by the context length
    generator: torch.Generator | None = None
    tenant: str | None = None  # the prefix pool's tenant of this request (None: the pool's own)
    use_prefix: bool = True  # load from and store to the prefix pool (if the engine has one)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # one of FINISH_REASONS once finished
    error: str | None = None  # why, when finish_reason == "error"
    prefilled: int = 0  # prompt tokens whose KV is in the cache
    cached_tokens: int = 0  # of those, tokens loaded from the prefix pool instead of computed

    @property
    def total_tokens(self) -> int:
        """Tokens the request may hold in the cache: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.max_new


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request, for streaming; or, with ``token_id`` -1, the end of
    a request that stopped without a token (aborted, failed)."""

    seq_id: int
    token_id: int
    text_delta: str
    finish_reason: str | None  # None while the request runs; one of FINISH_REASONS on its last event


class Detokenizer:
    """Incremental text of a request: emits only complete characters, applies stop strings."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def update(self, req: Request) -> tuple[str, bool]:
        if self.tokenizer is None:
            return "", False
        text = self.tokenizer.decode(req.output_ids, skip_special_tokens=True)
        for stop in req.params.stop:
            cut = text.find(stop)
            if cut >= 0:
                delta = text[len(req.text) : cut] if cut > len(req.text) else ""
                req.text = text[:cut]
                return delta, True
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return "", False
        delta, req.text = text[len(req.text) :], text
        return delta, False


def accept_token(req: Request, token: int, eos_ids: tuple[int, ...], detok: Detokenizer) -> TokenEvent:
    """Take one sampled token into ``req``; sets ``finish_reason`` when it ends the request."""
    p = req.params
    if (token in eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
        req.finish_reason = "stop"
        return TokenEvent(req.seq_id, token, "", "stop")
    req.output_ids.append(token)
    delta, stopped = detok.update(req)
    if stopped:
        req.finish_reason = "stop"
    elif len(req.output_ids) >= req.max_new:
        req.finish_reason = "length"
    return TokenEvent(req.seq_id, token, delta, req.finish_reason)


def end_event(req: Request, reason: str, error: str | None = None) -> TokenEvent:
    """Finish ``req`` without a token (``abort`` or ``error``)."""
    req.finish_reason, req.error = reason, error
    return TokenEvent(req.seq_id, -1, "", reason)
