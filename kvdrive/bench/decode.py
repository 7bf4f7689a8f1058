"""``kvdrive bench decode``: decode throughput of every KV placement side by side, one run,
one GPU, one model, the same contexts and batches.

Contexts are filled without a prefill (``fill_random``: seeded random post-RoPE K/V
through each cache's own plan/append/commit path), then each system decodes greedily
with the real model; only the decode steps after warm-up are timed. Every row also
carries the roofline bound of its step (``roofline.py``) and the fraction of it
reached. A (context, batch) that a system cannot hold is skipped with the reason,
never crashes the run. Systems are listed in ``decode_systems.py``; what they are and
how to read the numbers is in docs/bench.md.
"""

from __future__ import annotations

import gc
import json
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from kvdrive import device as devices
from kvdrive.bench import roofline
from kvdrive.bench.decode_fill import fill_random, fill_text
from kvdrive.bench.decode_report import merge, plot, run_notes, save
from kvdrive.bench.decode_systems import (
    SYSTEMS,
    Options,
    Shape,
    System,
    budget_tokens,
    hf_decode,
    mem_available,
    remove_disk_files,
    skip_reason,
)
from kvdrive.cache.base import KVCache
from kvdrive.cache.sparse import SparseConfig
from kvdrive.commands.common import parse_cache_tokens, parse_count_or_auto
from kvdrive.engine.micro_batch import MicroBatchedDecode
from kvdrive.errors import CapacityError, KvdriveError
from kvdrive.progress import progress
from kvdrive.quant.formats import KV_DTYPES
from kvdrive.storage.layout import GroupLayout
from kvdrive.tiered.config import DISK_MISSES, TieredConfig

GIB = 1 << 30


def add_arguments(p) -> None:
    p.add_argument(
        "-m",
        "--model",
        default="random:llama-3.1-8b",
        help="model spec (default random:llama-3.1-8b: random weights of the real shape)",
    )
    p.add_argument("--device", default="auto", help="device (default: CUDA if present, else CPU)")
    p.add_argument("--dtype", default=None, help="model and KV dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument(
        "-c",
        "--contexts",
        type=int,
        nargs="+",
        default=[32768, 131072],
        help="tokens per sequence when decoding ends: each cache is built for this many, filled to it "
        "minus the decode steps (default 32768 131072; powers of two keep torch's pinned allocator "
        "from rounding host memory up)",
    )
    p.add_argument(
        "-b",
        "--batches",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 16],
        help="batch sizes; each system runs those it can hold (default 1 2 4 8 16)",
    )
    p.add_argument(
        "--systems",
        nargs="+",
        choices=list(SYSTEMS),
        default=list(SYSTEMS),
        metavar="SYSTEM",
        help=f"systems to run, from: {', '.join(SYSTEMS)} (default all; see docs/bench.md)",
    )
    p.add_argument("-n", "--new-tokens", type=int, default=32, help="decode steps timed per row (default 32)")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps before timing (default 3, min 1)")
    p.add_argument(
        "--row-seconds",
        type=float,
        default=30.0,
        help="time cap per row: fewer steps are timed (at least 3) when the last warm-up step says "
        "N steps would take longer (default 30)",
    )
    g = p.add_argument_group("sparse systems (the same for every one)")
    g.add_argument(
        "--summary",
        default="minmax",
        choices=("minmax", "mean", "tokenmax", "tokenlse"),
        help="group summary that scores selection (default minmax)",
    )
    g.add_argument(
        "--budget",
        type=int,
        default=2048,
        help="tokens attended per step on global layers, sinks and window included (default 2048)",
    )
    g.add_argument("--group-tokens", type=int, default=16, help="tokens per KV group (default 16)")
    g.add_argument("--sink", type=int, default=64, help="attention-sink tokens always attended (default 64)")
    g.add_argument("--window", type=int, default=256, help="recent tokens always attended (default 256)")
    g.add_argument(
        "--cache-tokens",
        type=parse_cache_tokens,
        default=4096,
        metavar="TOKENS|auto",
        help="GPU selection cache of kvdrive_host and kvdrive_ssd, tokens per sequence per layer on "
        "average (default 4096: a fixed GPU budget, what bench/results ran; auto: 80%% of the GPU "
        "memory free when the row's cache is built, as kvdrive generate does)",
    )
    g.add_argument(
        "--eviction",
        choices=["lookahead", "lru"],
        default="lookahead",
        help="eviction of kvdrive_host and kvdrive_ssd (default lookahead; lru is the ablation)",
    )
    g.add_argument(
        "--rebalance-after",
        type=int,
        default=TieredConfig.rebalance_after,
        help="tiered caches: decode steps before each "
        "layer's GPU cache share follows its measured misses; these steps (+1) are added to their "
        "warm-up so timing sees the steady state (default %(default)s; 0: never rebalance)",
    )
    g.add_argument(
        "--no-prefetch",
        action="store_true",
        help="ablation: no next-layer prefetch in the tiered systems (every miss fetched when its layer runs)",
    )
    g.add_argument(
        "--prefetch-min-precision",
        type=float,
        default=TieredConfig.prefetch_min_precision,
        help="tiered systems: after the warm-up a layer keeps prefetching only if at least this share "
        "of what it prefetched was then selected (default %(default)s; 0: always prefetch)",
    )
    g.add_argument(
        "--micro-batches",
        type=parse_count_or_auto,
        default="auto",
        help="kvdrive_host and kvdrive_ssd: batch parts decoded on their own CUDA streams, layer by "
        "layer in turn, fetching in turn on one stream, so one part's fetch overlaps another's "
        "compute (default auto: 2 on CUDA, 1 elsewhere; 1: off, the ablation)",
    )
    g.add_argument(
        "--fetch-programs",
        type=parse_count_or_auto,
        default="auto",
        help="kvdrive_host and kvdrive_ssd: run the host->GPU fetch kernel on this many looping programs "
        "(SMs), leaving the rest to compute beside it, e.g. another micro-batch (default auto: a "
        "quarter of the SMs with micro-batches, else 0; 0: one program per group block)",
    )
    g.add_argument(
        "--no-fetch-lane",
        action="store_true",
        help="ablation, with --micro-batches: each part fetches on its own stream, so parts fetching at "
        "once share PCIe (default: one fetch stream in issue order, the parts take turns)",
    )
    g.add_argument(
        "--control-stream",
        action="store_true",
        help="experiment, with --micro-batches: each part's score, selection and cache update on a "
        "highest-priority stream, ahead of the other part's GEMMs (default off: not yet measured)",
    )
    g.add_argument(
        "--kv-dtype",
        nargs="+",
        choices=KV_DTYPES,
        default=["bf16"],
        metavar="{bf16,fp8,int8,int4}",
        help="storage formats of the tiered systems' host and disk tiers: each tiered system runs once per "
        "format in this run, rows carry kv_dtype, ratios compare each format with bf16 (default bf16: the model dtype)",
    )
    d = p.add_argument_group("kvdrive_ssd")
    d.add_argument(
        "--disk",
        nargs="+",
        default=["bench/decode-disk"],
        help="disk pool directories; each row writes under DIR/kvdrive-bench-decode and removes it "
        "after (default bench/decode-disk)",
    )
    d.add_argument(
        "--disk-gib",
        type=float,
        default=48.0,
        help="most GiB written per directory; rows needing more, or more than is free, are skipped (default 48)",
    )
    d.add_argument(
        "--disk-misses",
        choices=DISK_MISSES,
        default=TieredConfig.disk_misses,
        help="kvdrive_ssd and kvswap_ssd: selected groups only on disk are read before the layer "
        "attends (wait: exact, one host sync per layer and micro-batch) or left out of that "
        "step and read for later ones (defer: no sync, CUDA graphs; the step attends to fewer "
        "groups) (default wait)",
    )
    d.add_argument(
        "--ssd-host-gib",
        type=float,
        default=8.0,
        help="pinned host arena in front of the disks, all layers together (default 8)",
    )
    p.add_argument(
        "--no-overlap",
        action="store_true",
        help="ablation: host->GPU copies on the compute stream (streaming and the tiered caches)",
    )
    p.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="decode eagerly instead of as a CUDA graph (full_gpu, and the tiered caches where they support graphs)",
    )
    p.add_argument(
        "--breakdown-steps",
        type=int,
        default=4,
        help="after timing, this many extra eager steps of the tiered caches with their per-phase "
        "profile (the step-time breakdown; default 4, 0: none)",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="after timing, profile --profile-steps more steps of each row "
        "(as timed: a CUDA graph where used) with torch.profiler: DIR/SYSTEM-CONTEXT-bBATCH.trace.json "
        "(Chrome trace) and .kernels.json (GPU kernels by time per step); the row gets the table",
    )
    p.add_argument("--profile-steps", type=int, default=3, help="decode steps under --profile (default 3)")
    p.add_argument(
        "--fill-chunk",
        type=int,
        default=8192,
        help="tokens per plan/append/commit when filling contexts (default 8192)",
    )
    p.add_argument(
        "--gpu-headroom-gib",
        type=float,
        default=4.0,
        help="GPU memory left free beyond a system's estimate before a row runs (default 4)",
    )
    p.add_argument(
        "--host-headroom-gib",
        type=float,
        default=16.0,
        help="host memory (MemAvailable) left free beyond a system's estimate (default 16)",
    )
    p.add_argument(
        "--hf-max-tokens",
        type=int,
        default=65536,
        help="hf_offload runs only rows with context x batch <= this: it needs a real prefill, "
        "three per row (default 65536)",
    )
    p.add_argument("--hf-new-tokens", type=int, default=8, help="decode steps timed for hf_offload (default 8)")
    p.add_argument(
        "--bw-mib", type=int, default=1024, help="MiB per copy of the roofline's bandwidth probes (default 1024)"
    )
    p.add_argument(
        "--text",
        metavar="SOURCE",
        help="fill each sequence by prefilling real prose from this text "
        "source (kvdrive.eval.corpus: persuasion-excerpt ships with kvdrive; austen, jargon once fetched) "
        "instead of random KV, and decode the model's own greedy continuation: attention then has a real "
        "model's step-to-step locality (use a real model, e.g. -m smollm2)",
    )
    p.add_argument(
        "--decode-tokens",
        choices=("auto", "greedy", "random"),
        default="auto",
        help="what each decode step feeds back: the argmax of its logits (greedy) or a seeded random "
        "token, the same for every system (random). auto: random for random weights without "
        "--text (a random model's argmax trajectory is chaotic, so a kernel's last-bit rounding "
        "changes the locality the caches see), greedy otherwise",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights, KV and first tokens (default 0)")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="measure nothing: combine the rows of these "
        "results (a sweep split into runs that each fit a time limit; later files win) into --out, "
        "with best batches, ratios and plots",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots written next to the JSON")
    p.add_argument(
        "-o",
        "--out",
        default="bench/results/decode.json",
        help="JSON result path (default bench/results/decode.json; plots beside it)",
    )


def _release(dev: torch.device) -> None:
    """Give freed GPU memory and cached pinned host blocks back before the next row."""
    gc.collect()
    if dev.type != "cuda":
        return
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    accel = getattr(torch, "accelerator", None)
    empty_host = getattr(accel, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty_host is not None:
        empty_host()


def _step_fn(model, cache: KVCache, seq_ids: list[int], ids: torch.Tensor, graphs: bool):
    """One decode step of the batch: ids (B, 1) -> logits (B, V), committed."""
    if graphs and model.device.type == "cuda" and cache.supports_cuda_graphs:
        from kvdrive.engine.cuda_graph import GraphedDecodeStep

        graph = GraphedDecodeStep(model, cache, seq_ids, ids)

        def step(x):
            logits = graph(x)
            graph.commit()
            return logits

        step.graphed = True
        return step
    parts = MicroBatchedDecode(model, cache)

    def step(x):
        logits, batches = parts.forward(seq_ids, x)
        for batch in batches:
            cache.commit(batch)
        return logits

    step.graphed = False
    return step


def decode_tokens(args, random_weights: bool) -> str:
    """``--decode-tokens`` resolved: greedy or random."""
    if args.decode_tokens != "auto":
        return args.decode_tokens
    return "random" if random_weights and not args.text else "greedy"


def _feeder(args, vocab: int, batch: int, dev):
    """logits (B, V) -> the next step's input ids (B, 1), per ``args.feed`` (``decode_tokens``)."""
    if args.feed == "greedy":
        return lambda logits: logits.argmax(-1, keepdim=True)
    gen = torch.Generator(device=dev).manual_seed(args.seed + 1)
    return lambda logits: torch.randint(0, vocab, (batch, 1), generator=gen, device=dev)


def _breakdown(model, cache: KVCache, seq_ids: list[int], ids: torch.Tensor, args) -> dict:
    """ms per step by phase over ``--breakdown-steps`` extra eager steps, from the cache's
    ``StepProfile`` (events between phases; not the timed steps, which may be a graph)."""
    from kvdrive.tiered.cache import StepProfile

    cache.profile = StepProfile(model.device)
    step = _step_fn(model, cache, seq_ids, ids, graphs=False)
    feed = _feeder(args, model.config.vocab_size, len(seq_ids), model.device)
    for _ in range(args.breakdown_steps):
        ids = feed(step(ids))
    out = cache.profile.summary(args.breakdown_steps)
    cache.profile = None
    return out


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


def per_step(stats: dict, steps: int) -> dict:
    """Hit rates over the groups selected and bytes / times per decode step, from cache stats."""
    out = {}
    sel = stats.get("groups_selected") or 0
    if sel:
        for k in ("gpu_hits", "prefetched_hits", "sync_fetched", "deferred"):  # deferred: left out, read behind
            if k in stats:
                out[f"{k}_rate"] = stats[k] / sel
    for k in (
        "bytes_host_to_gpu",
        "bytes_gpu_to_host",
        "disk_reads",
        "read_ahead",
        "deferred_reads",
        "disk_writes",
        "host_waits",
    ):  # host_waits: the engine thread waited for the GPU to free arena slots
        if k in stats:
            out[f"{k}_per_step"] = stats[k] / steps
    if isinstance(stats.get("time_ms"), dict):
        out["time_ms_per_step"] = {k: v / steps for k, v in stats["time_ms"].items()}
    return out


def _decode_row(model, system: System, shape: Shape, opts: Options, args, dev, haystack=None) -> dict:
    avail0 = mem_available()
    t0 = time.perf_counter()
    cache = system.build(shape, dev, opts)
    try:
        seq_ids = list(range(shape.batch))
        for s in seq_ids:
            cache.add(s, shape.context)
        if haystack is not None:
            ids = fill_text(model, cache, seq_ids, shape.filled, haystack, args.fill_chunk, args.seed)  # (B, 1)
        else:
            fill_random(cache, seq_ids, shape.filled, shape.config, dev, shape.dtype, args.fill_chunk, args.seed)
            gen = torch.Generator(device=dev).manual_seed(args.seed)
            ids = torch.randint(0, shape.config.vocab_size, (shape.batch, 1), generator=gen, device=dev)  # (B, 1)
        devices.synchronize(dev)
        row = {"fill_s": time.perf_counter() - t0, "host_mem_used_gib": max(0, avail0 - mem_available()) / GIB}
        placed = cache.stats().get("bytes_placed_from_disk")
        if placed:  # a disk tier's initial placement read these back into the arena (in fill_s)
            row["placed_from_disk_gib"] = placed / GIB
        step = _step_fn(model, cache, seq_ids, ids, not args.no_cuda_graphs)
        feed = _feeder(args, shape.config.vocab_size, shape.batch, dev)
        for _ in range(args.warmup + system.settle_steps(opts) - 1):
            ids = feed(step(ids))
        devices.synchronize(dev)
        t0 = time.perf_counter()
        ids = feed(step(ids))
        devices.synchronize(dev)
        warm = time.perf_counter() - t0
        steps = max(min(3, args.new_tokens), min(args.new_tokens, int(args.row_seconds / warm)))
        cache.reset_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            ids = feed(step(ids))
        devices.synchronize(dev)
        elapsed = time.perf_counter() - t0
        row.update(tokens_per_s=shape.batch * steps / elapsed, step_ms=elapsed / steps * 1e3, steps_timed=steps)
        stats = cache.stats()
        if stats:
            stats = _jsonable(stats)
            row.update(stats=stats, per_step=per_step(stats, steps))
        row["cuda_graph"] = step.graphed
        if args.profile:
            from kvdrive.bench.kernel_profile import profile_steps

            name = f"{system.name}-{shape.context}-b{shape.batch}"
            row["profile"] = profile_steps(step, ids, args.profile_steps, Path(args.profile), name)
        if args.breakdown_steps and cache.supports_profile:
            row.setdefault("per_step", {})["time_ms_per_step"] = _breakdown(model, cache, seq_ids, ids, args)
        return row
    finally:
        cache.close()  # disk-backed caches: stop I/O threads, close extent files


def _slot_bytes(config, dtype: torch.dtype, group_tokens: int, kv_dtype: str = "bf16") -> int:
    """Bytes of one disk slot of the tiered caches' pool: a group of one layer in its format, aligned."""
    return GroupLayout.from_config(config, dtype, group_tokens, kv_dtype).slot_bytes


def _disk_bytes(shape: Shape, row: dict, group_tokens: int, kv_dtype: str) -> int:
    """Bytes a disk-backed row read from disk per step: its reads, read-ahead and reads behind
    (deferred misses), whole slots."""
    ps = row.get("per_step", {})
    reads = ps.get("disk_reads_per_step", 0) + ps.get("read_ahead_per_step", 0) + ps.get("deferred_reads_per_step", 0)
    return int(reads * _slot_bytes(shape.config, shape.dtype, group_tokens, kv_dtype))


def _pcie_bytes(system: System, shape: Shape, row: dict) -> int:
    if system.pcie == "all_kv":
        return shape.all_kv
    if system.pcie == "measured":
        return int(row.get("per_step", {}).get("bytes_host_to_gpu_per_step", 0))
    return 0


def measure_row(loaded, system: System, shape: Shape, opts: Options, args, bw, weights: int, haystack=None) -> dict:
    """Run one (system, context, batch); returns the row (skipped rows carry ``reason``)."""
    dev = loaded.model.device
    head = {"system": system.name, "context": shape.context, "batch": shape.batch, "filled": shape.filled}
    if system.formats:
        head["kv_dtype"] = opts.kv_dtype
    reason = skip_reason(system, shape, opts, args, dev, loaded)
    if reason:
        return {**head, "status": "skipped", "reason": reason}
    est = {"est_gpu_gib": system.gpu_bytes(shape, opts) / GIB, "est_host_gib": system.host_bytes(shape, opts) / GIB}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        if system.build is None:
            gen = torch.Generator(device=dev).manual_seed(args.seed)
            prompts = torch.randint(
                0,
                shape.config.vocab_size,
                (shape.batch, shape.context - args.hf_new_tokens - 1),
                generator=gen,
                device=dev,
            )
            row = hf_decode(loaded, prompts, args.hf_new_tokens)
        else:
            row = _decode_row(loaded.model, system, shape, opts, args, dev, haystack)
    except (torch.OutOfMemoryError, CapacityError) as err:
        return {**head, "status": "skipped", "reason": f"out of memory: {str(err).splitlines()[0][:200]}", **est}
    except KvdriveError as err:
        return {**head, "status": "skipped", "reason": str(err), **est}
    except Exception as err:  # noqa: BLE001 -- a bug in one system must not lose the other rows of a long run
        if "out of memory" in str(err).lower():  # e.g. pinned host allocation: a RuntimeError from CUDA
            return {**head, "status": "skipped", "reason": f"out of memory: {str(err).splitlines()[0][:200]}", **est}
        traceback.print_exc()
        return {**head, "status": "error", "reason": f"{type(err).__name__}: {err}", **est}
    if dev.type == "cuda":
        row["peak_gpu_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
    step_bytes = roofline.StepBytes(
        weights,
        system.gpu_kv_read(shape, opts),
        _pcie_bytes(system, shape, row),
        _disk_bytes(shape, row, args.group_tokens, opts.kv_dtype),
    )
    b = roofline.bound(shape.batch, step_bytes, bw)
    row["roofline"] = {
        "weights_bytes": step_bytes.weights,
        "gpu_kv_bytes": step_bytes.gpu_kv,
        "pcie_bytes": step_bytes.pcie,
        **(b.as_dict() if b else {}),
    }
    row["fraction_of_bound"] = row["tokens_per_s"] / b.tokens_per_s if b else None
    return {**head, "status": "ok", **row, **est}


def _config(args, loaded, sparse: SparseConfig, weights: int) -> dict:
    config, dtype = loaded.config, loaded.model.dtype
    return {
        "model": loaded.source,
        "dtype": str(dtype),
        "device": str(loaded.model.device),
        "contexts": args.contexts,
        "batches": sorted(args.batches),
        "systems": {n: SYSTEMS[n].about for n in args.systems},
        "new_tokens": args.new_tokens,
        "warmup": args.warmup,
        "row_seconds": args.row_seconds,
        "sparse": {
            "budget_tokens": {str(c): budget_tokens(sparse, c) for c in args.contexts},
            "group_tokens": args.group_tokens,
            "sink_tokens": args.sink,
            "window_tokens": args.window,
            "summary": args.summary,
        },
        "kv_dtypes": args.kv_dtype,
        "kvdrive_host": {
            "cache_tokens": args.cache_tokens,
            "eviction": args.eviction,
            "gpu_cache_gib_per_seq": None
            if args.cache_tokens == "auto"
            else args.cache_tokens * config.kv_bytes_per_token(dtype) / GIB,
            "prefetch": not args.no_prefetch,
            "rebalance_after": args.rebalance_after,
            "prefetch_min_precision": args.prefetch_min_precision,
            "micro_batches": args.micro_batches,
            "fetch_programs": args.fetch_programs,
            "fetch_lane": not args.no_fetch_lane,
            "control_stream": args.control_stream,
        },
        "kvdrive_ssd": {
            "disk": args.disk,
            "disk_gib_per_path": args.disk_gib,
            "host_arena_gib": args.ssd_host_gib,
            "disk_misses": args.disk_misses,
        },
        "overlap": not args.no_overlap,
        "cuda_graphs": not args.no_cuda_graphs,
        "fill_chunk": args.fill_chunk,
        "gpu_headroom_gib": args.gpu_headroom_gib,
        "host_headroom_gib": args.host_headroom_gib,
        "hf_max_tokens": args.hf_max_tokens,
        "hf_new_tokens": args.hf_new_tokens,
        "weights_gib": weights / GIB,
        "kv_bytes_per_token": config.kv_bytes_per_token(dtype),
        "fill": f"prefill of real prose ({args.text})" if args.text else "random KV, random first tokens",
        "decode_tokens": args.feed,
    }


def run(args) -> int:
    from kvdrive.models.loader import load_model

    if args.merge:
        return _summarize(merge(args.merge, args.out), args.no_plot)
    parts = 1 if args.micro_batches == "auto" else args.micro_batches
    if min(args.warmup, args.new_tokens, min(args.contexts), min(args.batches), parts) < 1:
        raise KvdriveError("--warmup, --new-tokens, --contexts, --batches and --micro-batches must be >= 1")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, seed=args.seed)
    model, dev, dtype, config = loaded.model, loaded.model.device, loaded.model.dtype, loaded.config
    args.feed = decode_tokens(args, loaded.random_weights)
    sparse = SparseConfig(
        group_tokens=args.group_tokens,
        budget=args.budget,
        sink_tokens=args.sink,
        window_tokens=args.window,
        summary=args.summary,
    )
    opts = Options(
        sparse,
        args.cache_tokens,
        args.eviction,
        not args.no_prefetch,
        not args.no_overlap,
        args.rebalance_after,
        tuple(args.disk),
        args.disk_gib,
        args.ssd_host_gib,
        args.micro_batches,
        args.prefetch_min_precision,
        args.fetch_programs,
        not args.no_fetch_lane,
        args.control_stream,
        args.disk_misses,
    )
    haystack = None
    if args.text:
        from kvdrive.eval.corpus import TokenHaystack, load_text

        if loaded.tokenizer is None:
            raise KvdriveError(
                f"--text needs a real model with a tokenizer; {args.model} has random weights (use e.g. -m smollm2)"
            )
        haystack = TokenHaystack(loaded.tokenizer, load_text(args.text).text)
    bw = roofline.measure(dev, args.bw_mib << 20)
    if any(SYSTEMS[n].on_disk for n in args.systems):
        disk_bw, disk_ms = roofline.measure_disk(args.disk[0], _slot_bytes(config, dtype, args.group_tokens))
        bw = replace(bw, disk=disk_bw, disk_latency_ms=disk_ms)
    _release(dev)
    weights = roofline.weight_bytes_read(model)
    config_doc = _config(args, loaded, sparse, weights)
    notes = run_notes(loaded.random_weights, args.warmup, args.rebalance_after, args.feed)
    rows = []
    points = [
        (c, s, f, b)
        for c in args.contexts
        for s in args.systems
        for f in (args.kv_dtype if SYSTEMS[s].formats else ["bf16"])
        for b in sorted(args.batches)
    ]
    # Every system decodes from the same filled length: room for the longest warm-up of the run.
    settle = max(SYSTEMS[n].settle_steps(opts) for n in args.systems)
    room = (
        max(
            args.hf_new_tokens,
            args.warmup + settle + args.new_tokens + args.breakdown_steps + (args.profile_steps if args.profile else 0),
        )
        + 1
    )
    failed: dict[tuple[int, str, str], int] = {}  # (context, system, format) -> batch that ran out of memory
    with torch.inference_mode():
        for ctx, name, fmt, b in progress(points, desc="decode rows"):
            system, row_opts = SYSTEMS[name], replace(opts, kv_dtype=fmt)
            shape = Shape(config, dtype, b, ctx, room)
            if (ctx, name, fmt) in failed:
                row = {
                    "system": name,
                    **({"kv_dtype": fmt} if system.formats else {}),
                    "context": ctx,
                    "batch": b,
                    "filled": shape.filled,
                    "status": "skipped",
                    "reason": f"batch {failed[ctx, name, fmt]} already ran out of memory",
                }
            else:
                row = measure_row(loaded, system, shape, row_opts, args, bw, weights, haystack)
                if row.get("reason", "").startswith("out of memory"):
                    failed[ctx, name, fmt] = b
            _release(dev)
            if system.disk_bytes(shape, row_opts):
                remove_disk_files(row_opts)
            rows.append(row)
            path = save(args.out, config_doc, bw.as_dict(), rows, notes)  # a run cut short keeps its rows
            print(
                {
                    k: round(v, 3) if isinstance(v, float) else v
                    for k, v in row.items()
                    if k not in ("stats", "per_step", "roofline")
                },
                flush=True,
            )
    return _summarize(path, args.no_plot)


def _summarize(path, no_plot: bool) -> int:
    print(f"wrote {path}")
    for r in json.loads(path.read_text())["results"]["ratios"]:
        fmt = f" {r['kv_dtype']} / {r['vs_kv_dtype']}" if "kv_dtype" in r else ""
        print(f"context {r['context']}: {r['system']} / {r['vs']}{fmt} = {r['ratio']:.2f}x")
    if not no_plot:
        try:
            for png in plot(path):
                print(f"wrote {png}")
        except KvdriveError as err:
            print(f"no plot: {err}")
    return 0
