"""``kvdrive info MODEL``: architecture and KV-cache arithmetic, without loading weights."""

from __future__ import annotations

import json

from kvdrive.commands.common import KV_DTYPES, MODEL_HELP, human_bytes, number


def add_parser(sub) -> None:
    p = sub.add_parser(
        "info",
        help="architecture, KV bytes per token and KV size at a context",
        description="Show a model's architecture and what its KV cache costs, without loading weights.",
    )
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument(
        "-c",
        "--context",
        type=number(int, 1, example="32768"),
        help="context length for the KV size (default: the model's)",
    )
    p.add_argument(
        "-b", "--batch", type=number(int, 1, example="4"), default=1, help="sequences for the KV size (default 1)"
    )
    p.add_argument(
        "--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"], help="KV dtype (default bfloat16)"
    )
    w = p.add_argument_group(
        "placement",
        "With --gpu-gib: where this batch's KV can live on such a GPU (arithmetic "
        "only; weights at 2 bytes per parameter for bf16/fp16)",
    )
    w.add_argument(
        "--gpu-gib",
        type=number(float, 0, above=True, example="80"),
        help="GPU memory to plan for, GiB (e.g. 80 for an H100, 24 for an L4)",
    )
    w.add_argument(
        "--host-gib",
        type=number(float, 0, above=True, example="128"),
        help="host memory for pinned KV, GiB (default: what this machine has available now)",
    )
    w.add_argument(
        "--budget",
        type=number(int, 1, example="2048"),
        default=2048,
        help="tiered cache: tokens attended per step (default 2048)",
    )
    w.add_argument(
        "--kv-dtype",
        choices=KV_DTYPES,
        default="bf16",
        help="tiered cache: storage format of the host tier, which the host bytes per sequence follow (default bf16)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from kvdrive.config import parse_dtype
    from kvdrive.errors import KvdriveError
    from kvdrive.models.loader import load_config

    cfg = load_config(args.model)
    dtype = parse_dtype(args.dtype)
    context = args.context or cfg.max_position_embeddings
    if context < 1 or args.batch < 1:
        raise KvdriveError("--context and --batch must be >= 1")
    windows = sorted({w for w in cfg.sliding_windows if w is not None})
    info = {
        "architecture": cfg.architecture,
        "parameters": cfg.num_parameters(),
        "layers": cfg.num_hidden_layers,
        "global_layers": len(cfg.global_layers),
        "sliding_windows": windows,
        "hidden_size": cfg.hidden_size,
        "query_heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_context": cfg.max_position_embeddings,
        "dtype": args.dtype,
        "kv_bytes_per_token_per_layer": cfg.kv_bytes_per_token_per_layer(dtype),
        "kv_bytes_per_token": cfg.kv_bytes_per_token(dtype),
        "context": context,
        "batch": args.batch,
        "kv_bytes_at_context": args.batch * cfg.kv_bytes_at(context, dtype),
        "kv_bytes_at_context_full_cache": args.batch * context * cfg.kv_bytes_per_token(dtype),
    }
    if args.gpu_gib is not None:
        info["placement"] = _placement(cfg, context, args, dtype)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("architecture", cfg.architecture),
        ("parameters", f"{info['parameters'] / 1e6:.1f} M"),
        (
            "layers",
            f"{cfg.num_hidden_layers} ({len(cfg.global_layers)} global"
            + (f", {cfg.num_hidden_layers - len(cfg.global_layers)} sliding window {windows})" if windows else ")"),
        ),
        ("heads", f"{cfg.num_attention_heads} query, {cfg.num_key_value_heads} KV, head_dim {cfg.head_dim}"),
        ("context", f"{cfg.max_position_embeddings} tokens"),
        (
            f"KV per token ({args.dtype})",
            f"{human_bytes(info['kv_bytes_per_token'])} "
            f"({human_bytes(info['kv_bytes_per_token_per_layer'])} per layer)",
        ),
        (
            f"KV at {context} tokens x {args.batch}",
            human_bytes(info["kv_bytes_at_context"])
            + (
                ""
                if not windows
                else f" (a cache that keeps every layer in full: {human_bytes(info['kv_bytes_at_context_full_cache'])})"
            ),
        ),
    ]
    if "placement" in info:
        rows += _placement_rows(info["placement"], args)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _placement(cfg, context: int, args, dtype) -> dict:
    from kvdrive.cache.sparse import SparseConfig
    from kvdrive.errors import KvdriveError
    from kvdrive.tiered import admission as tiered_admission
    from kvdrive.tiered.config import TieredConfig
    from kvdrive.tiered.host_kv import host_room

    if args.gpu_gib <= 0 or (args.host_gib is not None and args.host_gib <= 0):
        raise KvdriveError("--gpu-gib and --host-gib must be positive")
    host = int(args.host_gib * 2**30) if args.host_gib is not None else (host_room() or 0)
    tiered = TieredConfig(SparseConfig(budget=args.budget, sink_tokens=64, window_tokens=256), kv_dtype=args.kv_dtype)
    out = tiered_admission.plan(cfg, context, args.batch, dtype, tiered, int(args.gpu_gib * 2**30), host)
    out.update(gpu_gib=args.gpu_gib, host_bytes=host, budget=args.budget, kv_dtype=args.kv_dtype)
    return out


def _placement_rows(pl: dict, args) -> list[tuple[str, str]]:
    gib = 2**30
    rows = [
        (
            f"on a {pl['gpu_gib']:g} GiB GPU",
            (
                f"weights {human_bytes(pl['weights_bytes'])}, "
                f"{human_bytes(pl['gpu_room_bytes'])} left for KV (2 GiB headroom)"
            ),
        )
    ]
    if pl["all_kv_on_gpu"]:
        rows.append(("all KV on the GPU", f"fits ({human_bytes(pl['kv_bytes'])}): no --budget needed"))
        return rows
    rows.append(("all KV on the GPU", f"does not fit ({human_bytes(pl['kv_bytes'])})"))
    most = min(pl["tiered_seqs_gpu"], pl["tiered_seqs_host"])
    host = f"{pl['host_bytes'] / gib:.0f} GiB host"
    setting = f"--budget {pl['budget']}" + (f" --kv-dtype {pl['kv_dtype']}" if pl["kv_dtype"] != "bf16" else "")
    if pl["tiered_fits"]:
        rows.append(
            (
                setting,
                (
                    f"fits: {human_bytes(pl['tiered_host_bytes_per_seq'])} pinned host per sequence; GPU cache (auto) "
                    f"{pl['tiered_cache_tokens']} tokens per sequence and layer; up to {most} sequences "
                    f"({pl['tiered_seqs_gpu']} by GPU, {pl['tiered_seqs_host']} by {host})"
                ),
            )
        )
    else:
        fix = "add --disk DIR --host-gib N" if pl["tiered_seqs_host"] < args.batch else "lower the batch or context"
        rows.append(
            (
                setting,
                (
                    f"batch {args.batch} does not fit ({human_bytes(pl['tiered_host_bytes_per_seq'])} pinned host "
                    f"per sequence): {pl['tiered_seqs_gpu']} sequences by GPU, {pl['tiered_seqs_host']} by {host}; {fix}"
                ),
            )
        )
    return rows
