"""A fixed list of requests through the engine: ``run`` yields each token as it is made.

The benchmarks and tests that drive a model and a cache directly use this; ``LLM`` and
the server submit to an ``Engine`` themselves. Requests queue and are admitted while the
batch has room; each prompt is prefilled in chunks; the batch decodes one token a step;
finished sequences leave and free their KV at once, and queued requests take their places
(continuous batching, ``kvdrive.engine.core``).
"""

from __future__ import annotations

from collections.abc import Iterator

from kvdrive.cache.base import KVCache
from kvdrive.engine.core import PREFILL_CHUNK, Engine
from kvdrive.engine.request import Detokenizer, Request, TokenEvent
from kvdrive.progress import progress

__all__ = ["PREFILL_CHUNK", "Detokenizer", "Request", "TokenEvent", "run"]


def run(
    model,
    cache: KVCache,
    requests: list[Request],
    eos_ids: tuple[int, ...],
    tokenizer,
    prefill_chunk: int = PREFILL_CHUNK,
    cuda_graphs: bool = True,
    prefix=None,
    max_batch: int | None = None,
    step_tokens: int | None = None,
) -> Iterator[TokenEvent]:
    """Generate for ``requests``; yields one ``TokenEvent`` per token.

    ``max_batch``: sequences decoding at once (default: the cache's ``max_seqs``).
    ``step_tokens``: the engine's per-step token budget (None: every admissible prompt is
    prefilled whole before the next decode step). ``prefix``: a ``PrefixPool``. A request
    still in the engine when the caller stops iterating stays in the cache: the caller frees
    it (``LLM`` does)."""
    total_prompt = sum(len(r.prompt_ids) for r in requests)
    with progress(total=total_prompt, desc="prefill", unit="tok", enabled=total_prompt > 4096) as bar:
        engine = Engine(
            model,
            cache,
            eos_ids,
            tokenizer,
            prefix=prefix,
            max_batch=max_batch,
            step_tokens=step_tokens,
            prefill_chunk=prefill_chunk,
            cuda_graphs=cuda_graphs,
            on_prefill=bar.update,
        )
        for req in requests:
            engine.add_request(req)
        while engine.has_unfinished():
            yield from engine.step()
