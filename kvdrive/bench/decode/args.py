"""The command line of ``kvdrive bench decode``: its options, what they resolve to (the
tokens each step feeds back, the systems' ``Options``), and the ``config`` block of the
result that records them."""

from __future__ import annotations

from kvdrive.bench.decode.memory import budget_tokens
from kvdrive.bench.decode.points import GIB, Options
from kvdrive.bench.decode.systems import SYSTEMS
from kvdrive.cache.sparse import SparseConfig
from kvdrive.commands.common import BENCH_MODEL, add_model_options, parse_cache_tokens, parse_count_or_auto
from kvdrive.quant.formats import KV_DTYPES
from kvdrive.tiered.config import DISK_MISSES, TieredConfig


def add_arguments(p) -> None:
    add_model_options(p, default=BENCH_MODEL)
    p.add_argument(
        "-c",
        "--contexts",
        type=int,
        nargs="+",
        default=[32768, 131072],
        help="tokens per sequence when decoding ends: each cache is built for this many, filled to it "
        "minus the decode steps (default 32768 131072)",
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
        "(as timed: a CUDA graph where used) with torch.profiler: DIR/SYSTEM-CONTEXT-bBATCH[-KV_DTYPE].trace.json "
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


def decode_tokens(args, random_weights: bool) -> str:
    """``--decode-tokens`` resolved: greedy or random."""
    if args.decode_tokens != "auto":
        return args.decode_tokens
    return "random" if random_weights and not args.text else "greedy"


def options(args) -> Options:
    """The systems' settings from the command line; ``kv_dtype`` stays the default, each row sets its own."""
    sparse = SparseConfig(
        group_tokens=args.group_tokens,
        budget=args.budget,
        sink_tokens=args.sink,
        window_tokens=args.window,
        summary=args.summary,
    )
    return Options(
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


def run_config(args, loaded, sparse: SparseConfig, weights: int) -> dict:
    """The ``config`` block of the result: the model, the sweep and every setting a row ran with."""
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
