"""``kvdrive info MODEL``: architecture and KV-cache arithmetic, without loading weights."""

from __future__ import annotations

import json

from kvdrive.commands.common import MODEL_HELP, human_bytes


def add_parser(sub) -> None:
    p = sub.add_parser(
        "info",
        help="architecture, KV bytes per token and KV size at a context",
        description="Show a model's architecture and what its KV cache costs, without loading weights.",
    )
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("-c", "--context", type=int, help="context length for the KV size (default: the model's)")
    p.add_argument("-b", "--batch", type=int, default=1, help="sequences for the KV size (default 1)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="KV dtype (default bfloat16)")
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
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("architecture", cfg.architecture),
        ("parameters", f"{info['parameters'] / 1e6:.1f} M"),
        ("layers", f"{cfg.num_hidden_layers} ({len(cfg.global_layers)} global"
                   + (f", {cfg.num_hidden_layers - len(cfg.global_layers)} sliding window {windows})" if windows else ")")),
        ("heads", f"{cfg.num_attention_heads} query, {cfg.num_key_value_heads} KV, head_dim {cfg.head_dim}"),
        ("context", f"{cfg.max_position_embeddings} tokens"),
        (f"KV per token ({args.dtype})", f"{human_bytes(info['kv_bytes_per_token'])} "
                                         f"({human_bytes(info['kv_bytes_per_token_per_layer'])} per layer)"),
        (f"KV at {context} tokens x {args.batch}", human_bytes(info["kv_bytes_at_context"])
         + ("" if not windows else f" (a cache that keeps every layer in full: "
                                   f"{human_bytes(info['kv_bytes_at_context_full_cache'])})")),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
