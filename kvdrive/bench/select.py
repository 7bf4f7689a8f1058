"""``kvdrive bench select``: what scoring and selection cost per layer vs the attention they save.

Llama-3.1-8B attention shape by default (32 query heads, 8 KV heads, head_dim 128,
bf16), batch 16 x 128K context, G=16 (8192 groups per sequence). For each summary kind
it builds the summaries of a random pool, then times per layer and decode step:

* score: ``summarizer.score`` over the padded (B, N_max, ...) summaries;
* select: ``select_groups`` (shared and per-head) under the token budget, + ``to_slots``;
* attention: full (Triton over every page; SDPA over contiguous K/V) vs sparse (Triton
  over the selected pages), so ``saved = full - sparse`` and ``select / saved``.
Summary memory (bytes per group, per token, for the batch) is reported beside it. Times
are medians of eager calls and (``*_graph_ms``) of CUDA-graph replays, the device time
a graph-captured decode step pays.
"""

from __future__ import annotations

import sys

import torch

from kvdrive import device as dev
from kvdrive.bench.attention import contiguous_kv, copy_gbps, full_table, make_pool, sdpa_decode, time_graph_ms
from kvdrive.bench.common import time_ms
from kvdrive.results import write_result
from kvdrive.retrieval.lowrank import KeyGram
from kvdrive.retrieval.pages import to_slots
from kvdrive.retrieval.select import Budget, SelectionConfig, select_groups
from kvdrive.retrieval.sparse_attention import sparse_attention, triton_available
from kvdrive.retrieval.summaries import SUMMARIZERS, make_summarizer

FIT_TOKENS = 1 << 16  # keys used to fit the low-rank bases (timing only needs a plausible basis)


def add_arguments(p) -> None:
    p.add_argument("--device", default="auto", help="device (default: CUDA if present)")
    p.add_argument("-b", "--batch", type=int, default=16, help="sequences (default 16)")
    p.add_argument("-c", "--context", type=int, default=131072, help="tokens per sequence (default 131072)")
    p.add_argument("--group-tokens", type=int, default=16, help="G (default 16)")
    p.add_argument("--heads", type=int, default=32, help="query heads (default 32)")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads (default 8)")
    p.add_argument("--head-dim", type=int, default=128, help="head dim (default 128)")
    p.add_argument("--budget", type=int, nargs="+", default=[2048, 8192], help="token budgets (default 2048 8192)")
    p.add_argument("--summaries", nargs="+", default=list(SUMMARIZERS), choices=list(SUMMARIZERS))
    p.add_argument("--rank", type=int, default=32, help="low-rank summaries' rank (default 32)")
    p.add_argument("--sink-tokens", type=int, default=16)
    p.add_argument("--window-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20, help="timed repeats, median kept (default 20)")
    p.add_argument("-o", "--out", default="bench/results/select.json", help="JSON result path")


def _summarizer(name, args, pool, device):
    h, d, g = args.kv_heads, args.head_dim, args.group_tokens
    if name.startswith("lowrank"):
        gram = KeyGram(h, d, device)
        gram.add(pool[: max(1, FIT_TOKENS // g), 0])
        if name == "lowrank_offline":
            return make_summarizer(name, h, d, g, basis=gram.basis(args.rank))
        s = make_summarizer(name, h, d, g, rank=args.rank, max_seqs=args.batch, device=device)
        s.bases[:] = gram.basis(args.rank)  # same basis per row: fitting time is reported apart
        return s
    return make_summarizer(name, h, d, g)


def _fit_ms(args, pool, device) -> float:
    """Per-sequence fit (lowrank_seq) on one sequence's keys, as done once after prefill."""
    s = make_summarizer(
        "lowrank_seq", args.kv_heads, args.head_dim, args.group_tokens, rank=args.rank, max_seqs=1, device=device
    )
    n = -(-args.context // args.group_tokens)
    keys = pool[:n, 0].transpose(1, 2).reshape(-1, args.kv_heads, args.head_dim)  # (T, H_kv, D)
    return time_ms(lambda: s.fit(0, keys), device, repeats=3, warmup=1)


def run(args) -> int:
    device = dev.resolve(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b, g, h_q, h_kv, d = args.batch, args.group_tokens, args.heads, args.kv_heads, args.head_dim
    torch.manual_seed(0)
    pool, n, last = make_pool(b, args.context, g, h_kv, d, dtype, device)
    q = torch.randn(b, h_q, d, device=device, dtype=dtype)
    scale = d**-0.5
    num_groups = torch.full((b,), n, device=device)
    rows = torch.arange(b, device=device)
    slot_table = rows[:, None] * n + torch.arange(n, device=device)  # (B, N)
    valid = torch.ones(b, n, dtype=torch.bool, device=device)
    valid[:, -1] = last[0] == g  # the partly filled group has no summary
    impl = "triton" if triton_available() and device.type == "cuda" else "torch"
    notes = [f"argv: {' '.join(sys.argv)}"]
    if impl != "triton":
        notes.append("no CUDA GPU or no triton: attention timed with the torch reference")

    attn = {"impl": impl}
    full_pt, full_np = full_table(b, n, h_kv, device)
    if impl == "triton":
        full = lambda: sparse_attention(q, pool, full_pt, full_np, last, scale, impl=impl)  # noqa: E731
        attn["full_ms"] = time_ms(full, device, args.repeats)
        attn["full_graph_ms"] = time_graph_ms(full, device, args.repeats)
    k, v = contiguous_kv(pool, b, n)
    attn["full_sdpa_ms"] = time_ms(lambda: sdpa_decode(q, k, v, scale), device, args.repeats)
    k = v = None  # free them before the summaries
    attn.setdefault("full_ms", attn["full_sdpa_ms"])
    results = []
    for name in args.summaries:
        s = _summarizer(name, args, pool, device)
        summ = s.summarize(pool[:, 0], rows.repeat_interleave(n)).view(b, n, *s.summary_shape)  # (B, N, ...)
        srows = rows if name == "lowrank_seq" else None
        score = lambda s=s, summ=summ, srows=srows: s.score(q, summ, valid, scale, rows=srows)  # noqa: E731
        entry = {
            "summary": name,
            "bytes_per_group": s.bytes_per_group(dtype),
            "bytes_per_token": s.bytes_per_group(dtype) / g,
            "batch_summary_mb": round(summ.numel() * summ.element_size() / 1e6, 1),
            "score_ms": time_ms(score, device, args.repeats),
            "score_graph_ms": time_graph_ms(score, device, args.repeats),
        }
        scores = score()
        for budget in args.budget:
            for mode in ("shared", "per_head"):
                cfg = SelectionConfig(
                    Budget(tokens=budget),
                    n_sink=-(-args.sink_tokens // g),
                    n_window=-(-args.window_tokens // g),
                    mode=mode,
                )
                p_max = min(n, max(-(-budget // g), cfg.n_sink + cfg.n_window))

                def select(scores=scores, cfg=cfg, p_max=p_max):
                    sel = select_groups(scores, num_groups, cfg, g, max_pages=p_max)
                    return sel, to_slots(sel.groups, slot_table)

                sel, pt = select()
                sparse = lambda pt=pt, sel=sel: sparse_attention(q, pool, pt, sel.num_pages, last, scale, impl=impl)  # noqa: E731
                r = {
                    "select_ms": time_ms(select, device, args.repeats),
                    "sparse_attention_ms": time_ms(sparse, device, args.repeats),
                    "select_graph_ms": time_graph_ms(select, device, args.repeats),
                    "sparse_attention_graph_ms": time_graph_ms(sparse, device, args.repeats),
                }
                for sfx, full_key in (("", "full_ms"), ("_graph", "full_graph_ms")):
                    if r[f"select{sfx}_ms"] is None or entry[f"score{sfx}_ms"] is None or not attn.get(full_key):
                        continue
                    total = entry[f"score{sfx}_ms"] + r[f"select{sfx}_ms"]
                    saved = attn[full_key] - r[f"sparse_attention{sfx}_ms"]
                    r.update(
                        {
                            f"score_plus_select{sfx}_ms": total,
                            f"saved{sfx}_ms": saved,
                            f"select_over_saved{sfx}": round(total / saved, 4) if saved > 0 else None,
                            f"sparse_step{sfx}_ms": total + r[f"sparse_attention{sfx}_ms"],
                        }
                    )
                entry[f"b{budget}_{mode}"] = r
        results.append(entry)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items()}, flush=True)
        summ = scores = None
    fit = _fit_ms(args, pool, device) if "lowrank_seq" in args.summaries else None
    config = {
        k: getattr(args, k)
        for k in (
            "batch",
            "context",
            "group_tokens",
            "heads",
            "kv_heads",
            "head_dim",
            "budget",
            "rank",
            "sink_tokens",
            "window_tokens",
            "repeats",
        )
    }
    config.update(dtype=str(dtype), groups_per_sequence=n, copy_gbps_read_plus_write=copy_gbps(device))
    doc = {"attention": attn, "lowrank_seq_fit_ms_per_sequence": fit, "per_summary": results}
    print({"attention": attn, "lowrank_seq_fit_ms": fit})
    path = write_result(args.out, "select", config, doc, notes)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
