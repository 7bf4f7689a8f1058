"""``kvdrive bench prefill``: prefill tokens/s and TFLOP/s of the plain cache ``LLM`` uses
(``PagedKVCache``) and the tiered cache, beside transformers' own forward
(``attn_implementation="sdpa"``) on the same weights, in one run; ``contiguous``
(``ContiguousKVCache``, the reference cache) is an extra system to compare the paged one with.

kvdrive prefills as the engine does: ``--chunk``-token pieces, each attending to the cached
prefix plus itself (``chunk_attention``). transformers runs its standard prefill: one forward
over the whole prompt with a ``DynamicCache`` and only the last position's logits; where its
estimated peak would not fit the free GPU memory it is skipped, and the JSON says why.

FLOPs of a prompt of L tokens: ``kvdrive.models.flops.prefill_flops`` (docs/bench.md).
"""

from __future__ import annotations

import contextlib
import gc
import time

import torch

from kvdrive import device as devices
from kvdrive import env
from kvdrive.commands.common import BENCH_MODEL, add_model_options
from kvdrive.models.flops import prefill_flops
from kvdrive.results import write_result

PREFILL_CHUNK = 2048  # the engine's prefill piece
SYSTEMS = ("plain", "contiguous", "tiered", "transformers")
DEFAULT_SYSTEMS = ("plain", "tiered", "transformers")
TINY = dict(model="random:smollm2-135m", lengths=[32, 80], chunk=24)


def add_arguments(p) -> None:
    add_model_options(p, default=BENCH_MODEL)
    p.add_argument("-l", "--lengths", type=int, nargs="+", default=[4096, 32768, 131072], help="prompt tokens")
    p.add_argument("--chunk", type=int, default=PREFILL_CHUNK, help="kvdrive's prefill piece in tokens")
    p.add_argument(
        "--systems",
        nargs="+",
        default=list(DEFAULT_SYSTEMS),
        choices=SYSTEMS,
        help="plain (PagedKVCache, what LLM uses), contiguous (ContiguousKVCache), tiered, transformers "
        "(default: plain tiered transformers)",
    )
    p.add_argument("--repeats", type=int, default=1, help="timed prefills per system and length; the median is kept")
    p.add_argument("--tiny", action="store_true", help="CPU smoke sizes (random SmolLM2 shape, short prompts)")
    p.add_argument("-o", "--out", default="bench/results/prefill.json")


def _kvdrive_prefill(model, cache, ids: torch.Tensor, chunk: int) -> int:
    """Prefill sequence 0 of ``cache`` (registered fresh) in ``chunk`` pieces: the first token's id."""
    logits = None
    for begin in range(0, ids.shape[0], chunk):
        piece = ids[begin : begin + chunk][None]  # (1, T)
        batch = cache.plan([0], piece.shape[1])
        logits = model(piece, cache, batch)
        cache.commit(batch)
    return int(logits.argmax())


def _make_cache(system: str, model, length: int, chunk: int):
    from kvdrive.cache.contiguous import ContiguousKVCache
    from kvdrive.cache.paged import PagedKVCache
    from kvdrive.tiered.cache import TieredConfig, TieredSparseKVCache

    cfg, dev, dt = model.config, model.device, model.dtype
    if system == "plain":
        return PagedKVCache(cfg, 1, length, dev, dt)
    if system == "contiguous":
        return ContiguousKVCache(cfg, 1, length, dev, dt)
    return TieredSparseKVCache(cfg, 1, length, dev, dt, TieredConfig(prefill_tokens=chunk))


def _timed(fn, dev) -> tuple[float, object]:
    devices.synchronize(dev)
    t0 = time.perf_counter()
    out = fn()
    devices.synchronize(dev)
    return time.perf_counter() - t0, out


def _peak_gib(dev) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def _reset_peak(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def run_kvdrive(system: str, model, ids: torch.Tensor, chunk: int, repeats: int) -> dict:
    dev, length = model.device, ids.shape[0]
    cache = _make_cache(system, model, length, min(chunk, length))
    times, row = [], {}
    for _ in range(repeats):
        with contextlib.suppress(KeyError):
            cache.free(0)
        cache.add(0, length)
        cache.reset_stats()
        _reset_peak(dev)
        t, token = _timed(lambda: _kvdrive_prefill(model, cache, ids, chunk), dev)
        times.append(t)
        row["first_token"] = token
        if system == "tiered":
            row["staged"] = cache.prefill.staged(cache.seqs.slot(0))  # prefilled with its KV on the GPU
            row["place_s"], _ = _timed(lambda: cache.place([0]), dev)
            s = cache.stats()
            row.update(
                bytes_host_to_gpu=s["bytes_host_to_gpu"] - s["bytes_warm_start"],
                bytes_gpu_to_host=s["bytes_gpu_to_host"],
                bytes_warm_start=s["bytes_warm_start"],
            )
    row.update(prefill_s=sorted(times)[len(times) // 2], times_s=times, peak_gpu_gib=_peak_gib(dev))
    cache.close()
    return row


def hf_peak_estimate(cfg, length: int, dtype: torch.dtype) -> int:
    """Bytes transformers' one-pass prefill needs besides the weights: its DynamicCache, and per
    token the widest layer's activations (hidden states and residuals ~8 x hidden, the MLP's gate,
    up and product ~4 x intermediate, K/V repeated to every query head ~4 x H_q x D)."""
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    act = 8 * cfg.hidden_size + 4 * cfg.intermediate_size + 4 * cfg.num_attention_heads * cfg.head_dim
    return length * (kv + act) * dtype.itemsize


def run_transformers(hf, model, ids: torch.Tensor, repeats: int) -> dict:
    dev, length = model.device, ids.shape[0]
    if dev.type == "cuda":
        need = hf_peak_estimate(model.config, length, model.dtype)
        free = torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        if need > free:
            return {
                "skipped": f"estimated {need / 2**30:.1f} GiB for the cache and activations, "
                f"{free / 2**30:.1f} GiB free"
            }

    def forward():
        with torch.inference_mode():
            out = hf(ids[None], use_cache=True, logits_to_keep=1)  # its prefill: a DynamicCache of the prompt
            return int(out.logits[0, -1].argmax())

    times, token = [], None
    try:
        for _ in range(repeats):
            _reset_peak(dev)
            t, token = _timed(forward, dev)
            times.append(t)
    except torch.cuda.OutOfMemoryError as e:  # the estimate was short: say so, keep the other rows
        return {"skipped": f"out of GPU memory: {str(e).splitlines()[0]}"}
    return {
        "prefill_s": sorted(times)[len(times) // 2],
        "times_s": times,
        "first_token": token,
        "peak_gpu_gib": _peak_gib(dev),
    }


def attention_kernels(model, chunk: int) -> list[str] | None:
    """CUDA kernels one prefill chunk's attention runs (shapes of the model, a prefix of one
    chunk), by the profiler; None off CUDA."""
    if model.device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    from kvdrive.cache.contiguous import chunk_attention, layer_specs

    cfg, dev, dt = model.config, model.device, model.dtype
    q = torch.randn(1, cfg.num_attention_heads, chunk, cfg.head_dim, device=dev, dtype=dt)
    k, v = torch.randn(2, 1, cfg.num_key_value_heads, 2 * chunk, cfg.head_dim, device=dev, dtype=dt)
    spec = layer_specs(cfg)[0]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        chunk_attention(q, k, v, chunk, spec)
        torch.cuda.synchronize(dev)
    cuda = torch.autograd.DeviceType.CUDA
    return sorted({e.key for e in prof.key_averages() if getattr(e, "device_type", cuda) == cuda})


def _release(dev) -> None:
    gc.collect()
    devices.release_cached(dev)


def print_table(results: list[dict], systems) -> None:
    print(
        f"{'tokens':>8} {'system':>13} {'seconds':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'vs plain':>8} {'peak GiB':>8}"
    )
    for r in results:
        plain = r.get("plain", {}).get("prefill_s")
        for name in systems:
            row = r[name]
            if "skipped" in row:
                print(f"{r['length']:>8} {name:>13}  skipped: {row['skipped']}")
                continue
            ratio = f"{row['prefill_s'] / plain:.2f}" if plain else "-"
            peak = f"{row['peak_gpu_gib']:.1f}" if row.get("peak_gpu_gib") is not None else "-"
            print(
                f"{r['length']:>8} {name:>13} {row['prefill_s']:>9.3f} {row['tokens_per_s']:>10.0f} "
                f"{row['tflops']:>8.1f} {ratio:>8} {peak:>8}"
            )


def run(args) -> int:
    from kvdrive.bench.model import hf_model
    from kvdrive.models.loader import load_model

    if args.tiny:
        args.model, args.lengths, args.chunk = TINY["model"], TINY["lengths"], TINY["chunk"]
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, cfg, dev = loaded.model, loaded.config, loaded.model.device
    hf = hf_model(loaded) if "transformers" in args.systems else None
    if hf is not None and hf.config._attn_implementation != "sdpa":
        hf.set_attn_implementation("sdpa")
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(0, cfg.vocab_size, (max(args.lengths),), generator=gen).to(dev)
    with torch.inference_mode():  # warm-up: kernels, allocator, cuBLAS handles (a prefix of two chunks)
        warm = base[: min(2 * args.chunk + 1, base.shape[0])]
        for system in args.systems:
            if system == "transformers":
                if hf is not None:
                    run_transformers(hf, model, warm, 1)
            else:
                run_kvdrive(system, model, warm, args.chunk, 1)
            _release(dev)
    kernels = attention_kernels(model, args.chunk)
    print("attention kernels of a prefill chunk:", kernels, flush=True)
    results = []
    for length in sorted(args.lengths):
        ids = base[:length]
        flops = prefill_flops(cfg, length)
        entry = {"length": length, "flops": flops}
        for system in args.systems:
            if system == "transformers":
                row = (
                    run_transformers(hf, model, ids, args.repeats)
                    if hf is not None
                    else {"skipped": "transformers runs only on random:PRESET weights here"}
                )
            else:
                try:
                    row = run_kvdrive(system, model, ids, args.chunk, args.repeats)
                except torch.cuda.OutOfMemoryError as e:  # keep the other rows
                    row = {"skipped": f"out of GPU memory: {str(e).splitlines()[0]}"}
            if "prefill_s" in row:
                row["tokens_per_s"] = length / row["prefill_s"]
                row["tflops"] = flops["total"] / row["prefill_s"] / 1e12
            entry[system] = row
            _release(dev)
            print(length, system, {k: v for k, v in row.items() if k != "times_s"}, flush=True)
        ours = [entry[s]["first_token"] for s in args.systems if "first_token" in entry[s]]
        entry["first_tokens_agree"] = len(set(ours)) <= 1
        for other in ("tiered", "contiguous"):
            if "prefill_s" in entry.get("plain", {}) and "prefill_s" in entry.get(other, {}):
                entry[f"{other}_over_plain"] = entry[other]["prefill_s"] / entry["plain"]["prefill_s"]
        results.append(entry)
    config = {
        "model": loaded.source,
        "dtype": str(model.dtype),
        "device": str(dev),
        "lengths": args.lengths,
        "chunk": args.chunk,
        "systems": args.systems,
        "repeats": args.repeats,
        "plain": "PagedKVCache (what LLM uses), chunked prefill",
        "contiguous": "ContiguousKVCache (the reference cache), chunked prefill",
        "tiered": "TieredSparseKVCache, default TieredConfig (host-only tier), chunked prefill",
        "transformers": "one forward over the whole prompt, DynamicCache, sdpa, logits of the last position",
        "transformers_attn_implementation": hf.config._attn_implementation if hf is not None else None,
        "attention_kernels": kernels,
        "prefill_kernel": env.prefill_kernel(),  # KVDRIVE_PREFILL_KERNEL
    }
    notes = [
        "random weights of the real architecture's shape" if loaded.random_weights else "real weights",
        "plain: PagedKVCache, the cache LLM uses; contiguous (where run): ContiguousKVCache, the reference "
        "cache, on the same prompt (contiguous_over_plain)",
        "prefill_s: the prompt's forward passes, synchronized before and after; median of repeats",
        "TFLOP/s = (linear + causal attention FLOPs) / prefill_s; see prefill_flops and docs/bench.md",
        "tiered: place_s (initial placement after the prompt) is reported apart, not in prefill_s; "
        "bytes_host_to_gpu counts the prefill's gathers (0 when the prompt's KV stayed on the GPU)",
        "transformers is skipped, with the reason, where its estimated peak exceeds the free GPU memory",
    ]
    path = write_result(args.out, "prefill", config, results, notes)
    print_table(results, args.systems)
    print(f"wrote {path}")
    return 0
