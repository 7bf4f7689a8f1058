"""The generation loop: prefill each request, then decode the batch one token per step.

Requests queue and are admitted while the batch has room; each is prefilled alone, in
chunks (so a long prompt never needs a (T x T) attention matrix at once); the batch
decodes together with one ``plan``/forward/``commit`` per step over sequences of
different lengths. Finished sequences leave the batch and free their KV at once, and
queued requests take their places (continuous batching).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from kvdrive.cache.base import KVCache
from kvdrive.engine.micro_batch import MicroBatchedDecode
from kvdrive.engine.sampling import SamplingParams, sample
from kvdrive.progress import progress

PREFILL_CHUNK = 2048  # tokens per prefill forward; bounds the (T x L) attention mask


@dataclass
class Request:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int  # max_tokens, capped by the context length
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request, for streaming."""

    seq_id: int
    token_id: int
    text_delta: str
    finish_reason: str | None  # None while the request runs; "stop" or "length" on its last event


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


def _prefill(model, cache: KVCache, req: Request, chunk: int, bar, prefix=None) -> torch.Tensor:
    """Prefill ``req``'s prompt. ``prefix`` (a prefix pool, optional) first loads the KV of
    the longest stored prefix into ``cache`` and returns its length; at least the last
    prompt token is always computed, since its logits start the generation."""
    ids = torch.tensor(req.prompt_ids, device=model.device)
    logits = None
    done = prefix.load(model, cache, req.seq_id, req.prompt_ids) if prefix is not None else 0
    bar.update(done)
    for begin in range(done, len(ids), chunk):
        piece = ids[begin : begin + chunk][None]  # (1, T)
        batch = cache.plan([req.seq_id], piece.shape[1])
        logits = model(piece, cache, batch)
        cache.commit(batch)
        bar.update(piece.shape[1])
    if prefix is not None:
        prefix.store(cache, req.seq_id, req.prompt_ids)
    cache.place([req.seq_id])  # the tiered cache: initial placement by the prompt's attention
    return logits  # (1, V)


def run(model, cache: KVCache, requests: list[Request], eos_ids: tuple[int, ...], tokenizer,
        prefill_chunk: int = PREFILL_CHUNK, cuda_graphs: bool = True, prefix=None,
        max_batch: int | None = None) -> Iterator[TokenEvent]:
    """Generate for ``requests``; yields one ``TokenEvent`` per token.

    Continuous batching: requests wait in a queue and are admitted (registered, prefilled)
    while fewer than ``max_batch`` sequences decode (default: the cache's ``max_seqs``);
    a finished sequence frees its KV and the next request takes its place before the next
    decode step. ``cuda_graphs`` replays a captured decode step on CUDA when the cache
    supports static plans (recaptured when the batch changes). ``prefix``: an object with
    ``load(model, cache, seq_id, prompt_ids) -> int`` (tokens of KV it placed in the cache,
    < len(prompt)) and ``store(cache, seq_id, prompt_ids)``."""
    detok = Detokenizer(tokenizer)
    use_graphs = cuda_graphs and model.device.type == "cuda" and cache.supports_cuda_graphs
    max_batch = max_batch or cache.max_seqs
    graph, step = None, MicroBatchedDecode(model, cache)
    queue = deque(requests)
    active: list[Request] = []
    total_prompt = sum(len(r.prompt_ids) for r in requests)
    with progress(total=total_prompt, desc="prefill", unit="tok", enabled=total_prompt > 4096) as bar:
        while queue or active:
            while queue and len(active) < max_batch:  # admit
                req = queue.popleft()
                cache.add(req.seq_id, len(req.prompt_ids) + req.max_new)
                logits = _prefill(model, cache, req, prefill_chunk, bar, prefix)
                token = sample(logits, [req.params], [req.generator])[0]
                event = _accept(req, token, eos_ids, detok, cache)
                yield event
                if event.finish_reason is None:
                    active.append(req)
            if not active:
                continue
            seq_ids = [r.seq_id for r in active]
            ids = torch.tensor([[r.output_ids[-1]] for r in active], device=model.device)  # (B, 1)
            if use_graphs:
                if graph is None or not graph.matches(seq_ids):
                    from kvdrive.engine.cuda_graph import GraphedDecodeStep

                    graph = GraphedDecodeStep(model, cache, seq_ids, ids)
                logits = graph(ids)
                graph.commit()
            else:
                logits, batches = step.forward(seq_ids, ids)
                for batch in batches:
                    cache.commit(batch)
            tokens = sample(logits, [r.params for r in active], [r.generator for r in active])
            events = [_accept(req, token, eos_ids, detok, cache) for req, token in zip(active, tokens)]
            yield from events
            active = [req for req, event in zip(active, events) if event.finish_reason is None]


def _accept(req: Request, token: int, eos_ids: tuple[int, ...], detok: Detokenizer, cache: KVCache) -> TokenEvent:
    """Take one sampled token; a request that finishes frees its KV at once."""
    event = _token_event(req, token, eos_ids, detok)
    if event.finish_reason is not None:
        cache.free(req.seq_id)
    return event


def _token_event(req: Request, token: int, eos_ids: tuple[int, ...], detok: Detokenizer) -> TokenEvent:
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
