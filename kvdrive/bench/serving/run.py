"""``kvdrive bench serve``: an open-loop load against kvdrive's OpenAI-compatible server, and
against ``transformers serve`` under the same client and workload where it is given.

For each server and workload (``shared_prefix``, ``random``): Poisson arrivals at ``--rate``,
every request streamed; time to first token and inter-token latency (p50, p99), output
tokens/s, the prefix pool's hit rate (cached prompt tokens / prompt tokens, from ``usage``)
and errors. kvdrive runs each workload twice on the same server, prefix pool off and then
on (per request, ``kvdrive.prefix_cache``), with the same prompts. Optional: ``--interference``
(streams decoding while one long prompt is prefilled: their inter-token latency before and
during it), ``--repeat-doc`` (each document's TTFT cold, then asked again with its prefix
stored), ``--soak`` (a saturating closed-loop load for a while: errors, and the server's
resident and GPU memory over time) and ``--single-stream`` (one stream's decode tokens/s
through HTTP, and with ``--generate-baseline`` the same through ``LLM.generate`` with the
server's settings, in this process once the servers are stopped). The servers' memory is
sampled through every phase. JSON through ``kvdrive.results`` and a plot.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

from kvdrive.bench.serving import client as http
from kvdrive.bench.serving import servers, workloads

# every benchmark module has add_arguments and run (kvdrive/bench/__init__.py)
from kvdrive.bench.serving.args import add_arguments as add_arguments
from kvdrive.errors import KvdriveError
from kvdrive.results import write_result


def run(args) -> int:
    if args.rate <= 0 or args.max_tokens < 1 or args.docs < 1 or args.questions < 1:
        raise KvdriveError("--rate must be > 0; --max-tokens, --docs and --questions >= 1")
    nonce = secrets.token_hex(4)
    started: list[servers.Server] = []
    results, notes = {}, [f"prompts open with the run's nonce {nonce}: nothing stored by an earlier run can hit"]
    # one server at a time: each started here is stopped before the next starts, so neither idles beside the other
    starts = [_kvdrive] + ([_transformers] if args.transformers or args.transformers_url else [])
    try:
        for start in starts:
            server = start(args, started)
            results[server.kind] = _measure(server, args, nonce)
            server.stop()
    finally:
        for server in started:
            server.stop()
    if args.single_stream and args.generate_baseline:  # the servers' memory is free again
        results["generate_baseline"] = _generate_baseline(args)
        http_rate = results["kvdrive"].get("single_stream", {}).get("decode_tok_per_s")
        base = results["generate_baseline"]["decode_tok_per_s"]
        results["generate_baseline"]["http_over_generate"] = http_rate / base if http_rate and base else None
    if "transformers" in results:
        notes.append(
            "every request asks for exactly --max-tokens tokens: kvdrive with ignore_eos, transformers serve "
            "(which answers unknown fields such as ignore_eos with HTTP 422) with generation_config "
            '{"min_new_tokens": N}; short_outputs counts answers with fewer tokens, and a request answered '
            "with no token at all is an error (its finish_reason and usage are in error_examples)"
        )
    config = {k: v for k, v in vars(args).items() if k != "func"}
    config["nonce"] = nonce
    path = write_result(args.out, "serve", config, results, notes)
    print(f"wrote {path}")
    _print(results)
    try:
        from kvdrive.bench.serving.plot import plot

        print(f"wrote {plot(results, args.plot or str(path.with_suffix('.png')))}")
    except KvdriveError as err:
        print(f"no plot: {err}")
    return 0


DEFAULT_SERVE_ARGS = ["--max-model-len", "2048", "--prefix-host-gib", "1"]


def _kvdrive(args, started) -> servers.Server:
    if args.url:
        return servers.attach("kvdrive", args.url, args.ready_timeout)
    server = servers.start("kvdrive", [args.model, *(args.serve_arg or DEFAULT_SERVE_ARGS)], args.ready_timeout)
    started.append(server)
    return server


def _transformers(args, started) -> servers.Server:
    if args.transformers_url:
        return servers.attach("transformers", args.transformers_url, args.ready_timeout)
    model = servers.hf_dir_of(args.transformers)
    server = servers.start("transformers", [model, *args.transformers_arg], args.ready_timeout)
    started.append(server)
    return server


def _measure(server: servers.Server, args, nonce: str) -> dict:
    out = {"url": server.url, "model": server.model}
    warm = workloads.Item(workloads.Prompts(args.token_prompts, args.seed + 9, nonce).body(32, "warm-up"), "", True, 2)
    records, _ = asyncio.run(http.open_loop(server.url, server.model, [warm], [0.0], {}, kind=server.kind))
    if records[0].error:
        raise KvdriveError(f"{server.kind} server at {server.url} failed its warm-up request: {records[0].error}")
    pool = server.metrics().get("kvdrive:prefix_pool_capacity_bytes[host]", 0) + server.metrics().get(
        "kvdrive:prefix_pool_capacity_bytes[disk]", 0
    )
    if server.kind == "kvdrive":
        out["prefix_pool_bytes"] = pool
    for name in args.workloads:
        prompts = workloads.Prompts(args.token_prompts, args.seed, nonce)
        if name == "shared_prefix":
            items = workloads.shared_prefix(
                args.docs, args.questions, args.doc_tokens, args.max_tokens, prompts, args.seed
            )
        else:
            items = workloads.independent(args.random_prompts, args.prompt_tokens, args.max_tokens, prompts)
        times = workloads.arrivals(len(items), args.rate, args.seed)
        modes = ("off", "on") if server.kind == "kvdrive" else ("n/a",)
        for mode in modes:
            extra = {"kvdrive": {"prefix_cache": mode == "on"}} if server.kind == "kvdrive" else {}
            out[f"{name}/prefix_{mode}"] = _phase(server, items, times, extra)
    if server.kind == "kvdrive" and args.repeat_doc:
        out["repeat_doc"] = asyncio.run(_repeat_doc(server, args, nonce))
    if server.kind == "kvdrive" and args.interference:
        out["interference"] = asyncio.run(_interference(server, args, nonce))
    if args.single_stream:
        out["single_stream"] = _single(server, args, nonce)
    if args.soak:
        out["soak"] = asyncio.run(_soak(server, args, nonce))
    return out


def _phase(server: servers.Server, items, times, extra: dict) -> dict:
    """One open-loop run, with the server's memory sampled every second through it."""

    async def go():
        samples, done = [], asyncio.Event()

        async def sample():
            while not done.is_set():
                samples.append(await asyncio.to_thread(_memory, server))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), 1.0)

        sampler = asyncio.ensure_future(sample())
        try:
            return await http.open_loop(server.url, server.model, items, times, extra, kind=server.kind), samples
        finally:
            done.set()
            await sampler

    (records, wall), samples = asyncio.run(go())
    summary = http.summarize(records, wall)
    summary["memory"] = _growth(samples)
    return summary


def _memory(server: servers.Server) -> dict:
    m = server.metrics()
    return {
        "t": time.monotonic(),
        "rss": server.rss() or m.get("process_resident_memory_bytes"),
        "gpu": m.get("kvdrive:gpu_memory_allocated_bytes"),
        "gpu_reserved": m.get("kvdrive:gpu_memory_reserved_bytes"),
        "running": m.get("kvdrive:num_requests_running"),
        "waiting": m.get("kvdrive:num_requests_waiting"),
    }


def _growth(samples: list[dict], keys=("rss", "gpu")) -> dict:
    """Memory after the first fifth of a phase (warm-up), its peak after that, and at its end."""
    if not samples:
        return {}
    warm = samples[len(samples) // 5]
    last = samples[-1]
    out = {}
    for k in keys:
        later = [s[k] for s in samples[len(samples) // 5 :] if s[k] is not None]
        out[k] = {
            "after_warmup": warm[k],
            "end": last[k],
            "peak_after_warmup": max(later) if later else None,
            "growth": (last[k] - warm[k]) if warm[k] is not None and last[k] is not None else None,
        }
    return out


async def _interference(server: servers.Server, args, nonce: str) -> dict:
    """``--streams`` streams decoding; once each has made 4 tokens, one prompt of ``--interference``
    tokens arrives. Their inter-token gaps before it, and those that end while it is prefilled."""
    prompts = workloads.Prompts(args.token_prompts, args.seed + 1, nonce)
    # the streams run until the long prompt's first token: as long as the context lets them
    stream_items = workloads.independent(args.streams, 64, (server.max_model_len or 4096) - 256, prompts)
    long_item = workloads.Item(prompts.body(args.interference, "long prompt"), "", True, 1)
    async with http.new_client(3600.0) as c:
        start = time.perf_counter()
        live = [http.Record("", True, 0.0) for _ in stream_items]  # filled while the streams run
        tasks = [
            asyncio.ensure_future(http.send(c, server.url, server.model, it, {}, start, server.kind, rec))
            for it, rec in zip(stream_items, live)
        ]
        while not all(len(r.chunks) >= 4 or r.error for r in live):
            await asyncio.sleep(0.05)
        before_m = await asyncio.to_thread(server.metrics)
        long_rec = await http.send(c, server.url, server.model, long_item, {}, start, server.kind)
        after_m = await asyncio.to_thread(server.metrics)
        end = long_rec.chunks[0] if long_rec.chunks else time.perf_counter() - start
        for t in tasks:  # the streams' connections close: the server aborts them
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    before = [g for r in live for a, b in zip(r.chunks, r.chunks[1:]) if b <= long_rec.sent for g in [b - a]]
    timeline = sorted(
        (b - long_rec.sent, b - a) for r in live for a, b in zip(r.chunks, r.chunks[1:]) if b > long_rec.sent
    )
    during = [g for t, g in timeline if t <= end - long_rec.sent]
    p50, p99, p50_during = http.percentile(before, 50), http.percentile(during, 99), http.percentile(during, 50)
    return {
        "streams": args.streams,
        "long_prompt_tokens": long_rec.prompt_tokens,
        "long_ttft_s": long_rec.ttft,
        "long_error": long_rec.error,
        "itl_p50_before_s": p50,
        "itl_p99_during_s": p99,
        "itl_p50_during_s": p50_during,
        "gaps_during": len(during),
        "p99_during_over_p50_before": p99 / p50 if p50 and p99 else None,
        "p99_during_over_p50_during": p99 / p50_during if p50_during and p99 else None,
        "stream_errors": sorted({r.error for r in live if r.error})[:3],
        "prefill_s": end - long_rec.sent,
        # decode-step graph captures while the long prompt was prefilled (each stalls every stream)
        "graph_captures_during": _delta(before_m, after_m, "kvdrive:cuda_graph_captures_total"),
        "graph_capture_s_during": _delta(before_m, after_m, "kvdrive:cuda_graph_capture_seconds_total"),
        # (seconds since the long prompt was sent, gap) of every token the streams got after it
        "gaps_after_long_prompt": [[round(t, 4), round(g, 5)] for t, g in timeline],
    }


def _delta(before: dict, after: dict, name: str) -> float | None:
    """How far a /metrics counter moved (None: the server does not export it)."""
    return after[name] - before[name] if name in before and name in after else None


def _single(server: servers.Server, args, nonce: str) -> dict:
    prompts = workloads.Prompts(args.token_prompts, args.seed + 2, nonce)
    item = workloads.Item(prompts.body(64, "single"), "", True, args.single_stream)
    records, _ = asyncio.run(http.open_loop(server.url, server.model, [item], [0.0], {}, kind=server.kind))
    r = records[0]
    span = r.chunks[-1] - r.chunks[0] if len(r.chunks) > 1 else 0
    return {
        "tokens": r.output_tokens,
        "error": r.error,
        "ttft_s": r.ttft,
        "decode_tok_per_s": (len(r.chunks) - 1) / span if span > 0 else None,
    }


async def _repeat_doc(server: servers.Server, args, nonce: str) -> dict:
    """Documents one at a time, prefix pool on: each cold, then twice more with another question.
    TTFT p50 of the cold requests and of the repeated ones."""
    prompts = workloads.Prompts(args.token_prompts, args.seed + 3, nonce)
    cold, warm, cached, errors = [], [], [], []
    async with http.new_client(3600.0) as c:
        for d in range(args.repeat_docs):
            doc = prompts.body(args.repeat_doc, f"repeated document {d}")
            for q in range(3):
                item = workloads.Item(doc + prompts.question(q), f"doc{d}", q == 0, 4)
                r = await http.send(
                    c,
                    server.url,
                    server.model,
                    item,
                    {"kvdrive": {"prefix_cache": True}},
                    time.perf_counter(),
                    server.kind,
                )
                if r.error:
                    errors.append(r.error)
                    continue
                (cold if q == 0 else warm).append(r.ttft)
                if q:
                    cached.append(r.cached_tokens / r.prompt_tokens if r.prompt_tokens else 0.0)
    p_cold, p_warm = http.percentile(cold, 50), http.percentile(warm, 50)
    return {
        "doc_tokens": args.repeat_doc,
        "docs": args.repeat_docs,
        "ttft_cold_p50_s": p_cold,
        "ttft_repeated_p50_s": p_warm,
        "repeated_over_cold": p_warm / p_cold if p_cold and p_warm else None,
        "ttft_cold_s": cold,
        "ttft_repeated_s": warm,
        "repeated_cached_share": cached,
        "errors": errors[:3],
        "error_count": len(errors),
    }


async def _soak(server: servers.Server, args, nonce: str) -> dict:
    """``--soak-clients`` clients in a closed loop for ``--soak`` seconds (each sends its next prompt
    when its last one ends: the server never idles); memory sampled every 2 s."""
    prompts = workloads.Prompts(args.token_prompts, args.seed + 4, nonce)
    records, samples = [], []
    async with http.new_client(3600.0) as c:
        start = time.perf_counter()
        deadline = start + args.soak

        async def client(i: int) -> None:
            k = 0
            while time.perf_counter() < deadline:
                item = workloads.Item(prompts.body(args.soak_prompt_tokens, f"soak {i}.{k}"), "", True, args.max_tokens)
                records.append(await http.send(c, server.url, server.model, item, {}, start, server.kind))
                k += 1

        async def sample() -> None:
            while time.perf_counter() < deadline:
                m = await asyncio.to_thread(_memory, server)
                samples.append(
                    {
                        "t": m["t"] - start,
                        "rss": m["rss"],
                        "gpu": m["gpu"],
                        "gpu_reserved": m["gpu_reserved"],
                        "running": m["running"],
                        "waiting": m["waiting"],
                    }
                )
                await asyncio.sleep(2.0)

        await asyncio.gather(sample(), *(client(i) for i in range(args.soak_clients)))
        wall = time.perf_counter() - start
    summary = http.summarize(records, wall)
    summary.update(
        seconds=args.soak,
        clients=args.soak_clients,
        prompt_tokens_each=args.soak_prompt_tokens,
        memory=_growth(samples, ("rss", "gpu", "gpu_reserved")),
        samples=samples,
    )
    return summary


def _generate_baseline(args) -> dict:
    """The same decode through ``LLM.generate`` in this process, the model and KV cache as the
    kvdrive server's settings make them: (time of N tokens - time of 1) / (N - 1)."""
    import argparse

    from kvdrive.commands import serve as serve_command
    from kvdrive.engine.llm import LLM
    from kvdrive.engine.sampling import SamplingParams

    parser = argparse.ArgumentParser()
    serve_command.add_parser(parser.add_subparsers())
    config = serve_command.config_from_args(
        parser.parse_args(["serve", args.model, *(args.serve_arg or DEFAULT_SERVE_ARGS)])
    )
    n = args.single_stream
    m = config.model  # as the server loads it, less the prefix pool (one 64-token prompt never uses it)
    with LLM(
        m.model, device=m.device, dtype=m.dtype, max_model_len=m.max_model_len, seed=m.seed, kv_cache=config.kv.tiered()
    ) as llm:
        prompt = [1000 + i for i in range(64)]
        # warm-up, at the full length: the cache is built for it here, not inside a timed call
        llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        times = {}
        for k in (1, n):
            t0 = time.perf_counter()
            llm.generate([prompt], SamplingParams(max_tokens=k, temperature=0, ignore_eos=True))
            times[k] = time.perf_counter() - t0
    return {"tokens": n, "decode_tok_per_s": (n - 1) / (times[n] - times[1]) if times[n] > times[1] else None}


def _print(results: dict) -> None:
    for kind, res in results.items():
        for name, s in res.items():
            if isinstance(s, dict) and "ttft_p50_s" in s:
                print(
                    f"{kind:12s} {name:24s} ttft p50 {_ms(s['ttft_p50_s'])} p99 {_ms(s['ttft_p99_s'])}  itl p50 "
                    f"{_ms(s['itl_p50_s'])} p99 {_ms(s['itl_p99_s'])}  {s['output_tok_per_s'] or 0:7.1f} tok/s  "
                    f"hit {s['prefix_hit_rate'] or 0:.2f}  errors {s['errors']}"
                )


def _ms(x) -> str:
    return f"{x * 1000:8.0f} ms" if x is not None else "       - ms"
