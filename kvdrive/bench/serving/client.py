"""An open-loop HTTP client for any OpenAI-compatible server, and its statistics.

Every request streams ``/v1/completions`` (``stream_options.include_usage``) over its own
connection when it is due; the client records when it was sent, when each text chunk
arrived and the usage the server reported. From those: time to first token (send -> first
token), inter-token latency (between consecutive chunks of a request; one chunk is one
token on both servers measured here: kvdrive is asked for ``return_token_ids``, so a model
without a tokenizer streams too), output tokens per second over the run's wall time,
the share of prompt tokens the server reported as cached, and the errors.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

from kvdrive.bench.serving.workloads import Item


@dataclass
class Record:
    group: str
    first: bool
    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival time of each chunk with a token
    prompt_tokens: int = 0
    completion_tokens: int | None = None  # from usage (None: the server sent none)
    cached_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    max_tokens: int = 0  # asked for (0: unknown)

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] - self.sent if self.chunks else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunks)


def exact_length(kind: str, max_tokens: int) -> dict:
    """The fields that make a server generate exactly ``max_tokens`` tokens, whatever the model
    samples, and (kvdrive) send each token's id: vLLM's ``ignore_eos`` and ``return_token_ids`` for
    kvdrive; for transformers serve (which refuses fields it does not know with a 422) its
    ``generation_config`` JSON with ``min_new_tokens``."""
    if kind == "kvdrive":
        return {"ignore_eos": True, "return_token_ids": True}
    if kind == "transformers":
        return {"generation_config": json.dumps({"min_new_tokens": max_tokens})}
    return {}


async def send(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    item: Item,
    extra: dict,
    start: float,
    kind: str = "",
    rec: Record | None = None,
) -> Record:
    """One streamed completion of exactly ``item.max_tokens`` tokens from a ``kind`` server (see
    ``exact_length``); never raises (a failure is the record's ``error``). ``rec``: a record to
    fill as chunks arrive (the caller may read it meanwhile)."""
    rec = rec or Record(item.group, item.first, 0.0)
    rec.max_tokens = item.max_tokens
    rec.sent = time.perf_counter() - start
    body = {
        "model": model,
        "prompt": item.prompt,
        "max_tokens": item.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **exact_length(kind, item.max_tokens),
        **extra,
    }
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data.strip() == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    rec.error = str(obj["error"].get("message", obj["error"]))[:200]
                    break
                choices = obj.get("choices") or []
                if choices and (choices[0].get("text") or choices[0].get("token_ids")):
                    rec.chunks.append(time.perf_counter() - start)
                if choices and choices[0].get("finish_reason"):
                    rec.finish_reason = choices[0]["finish_reason"]
                usage = obj.get("usage")
                if usage:
                    rec.prompt_tokens = usage.get("prompt_tokens", 0)
                    rec.completion_tokens = usage.get("completion_tokens")
                    rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        rec.error = f"{type(err).__name__}: {err}"[:200]
    if rec.error is None and not rec.chunks:
        rec.error = (
            f"no token came back (finish_reason {rec.finish_reason}, usage completion_tokens {rec.completion_tokens})"
        )
    return rec


def new_client(timeout: float) -> httpx.AsyncClient:
    """A client with no cap on connections: every request in flight has its own."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=30.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
    )


async def open_loop(
    url: str, model: str, items: list[Item], times: list[float], extra: dict, timeout: float = 1800.0, kind: str = ""
) -> tuple[list[Record], float]:
    """Send ``items[i]`` at ``times[i]`` seconds from now, whatever is still running; returns the
    records (in item order) and the wall time from the first send to the last answer."""
    async with new_client(timeout) as client:
        start = time.perf_counter()

        async def at(t: float, item: Item) -> Record:
            await asyncio.sleep(max(0.0, t - (time.perf_counter() - start)))
            return await send(client, url, model, item, extra, start, kind)

        records = await asyncio.gather(*(at(t, it) for t, it in zip(times, items)))
    ends = [r.chunks[-1] for r in records if r.chunks]
    return list(records), (max(ends) - min(r.sent for r in records)) if ends else 0.0


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(records: list[Record], wall: float) -> dict:
    ok = [r for r in records if r.error is None]
    ttfts = [r.ttft for r in ok]
    itls = [x for r in ok for x in r.itls]
    prompt = sum(r.prompt_tokens for r in ok)
    out = sum(r.output_tokens for r in ok)
    first, later = [r.ttft for r in ok if r.first], [r.ttft for r in ok if not r.first]
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        # answered, but with fewer tokens than asked (a server that stopped at EOS despite being told not to)
        "short_outputs": sum(r.output_tokens < r.max_tokens for r in records if r.max_tokens),
        "error_examples": sorted({r.error for r in records if r.error})[:3],
        "wall_s": wall,
        "output_tokens": out,
        "output_tok_per_s": out / wall if wall > 0 else None,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(itls, 50),
        "itl_p99_s": percentile(itls, 99),
        "prompt_tokens": prompt,
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "prefix_hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else None,
        # shared prefixes: a document's first request (cold) against its later ones
        "ttft_first_of_group_p50_s": percentile(first, 50) if later else None,
        "ttft_later_of_group_p50_s": percentile(later, 50),
    }
