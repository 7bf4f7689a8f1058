"""``kvdrive bench attention``: the sparse attention kernel against its reference and the floor.

For each (batch, context) of the Llama-3.1-8B attention shape (32 query heads, 8 KV
heads, head_dim 128, bf16, G=16) it times, over one random group pool:

* full attention: the Triton kernel listing every page, and torch SDPA (flash) over the
  same K/V made contiguous: the all-on-GPU baseline;
* sparse attention over a budget (sinks + random groups + window): Triton and the torch
  reference;
and checks Triton against the reference (relative error of out, max error of lse).
Times are medians of eager calls (host launch overhead included) and, for Triton, of
CUDA-graph replays (device time, as in a graph-captured decode step).
Achieved bandwidth is reported against a measured device-to-device copy.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from kvdrive import device as dev
from kvdrive.bench.common import time_ms
from kvdrive.results import write_result
from kvdrive.retrieval.sparse_attention import sparse_attention_triton, triton_available
from kvdrive.retrieval.sparse_attention_ref import sparse_attention_ref

LLAMA = dict(h_q=32, h_kv=8, d=128)


def add_arguments(p) -> None:
    p.add_argument("--device", default="auto", help="device (default: CUDA if present)")
    p.add_argument(
        "--cases",
        nargs="+",
        default=["1x131072", "16x32768", "16x131072"],
        help="BATCHxCONTEXT cases (default 1x131072 16x32768 16x131072)",
    )
    p.add_argument("--group-tokens", type=int, default=16, help="G (default 16)")
    p.add_argument("--budget", type=int, default=2048, help="sparse budget in tokens (default 2048)")
    p.add_argument(
        "--block-tokens",
        type=int,
        nargs="+",
        default=[32, 64, 128],
        help="Triton tokens per inner iteration to try (default 32 64 128)",
    )
    p.add_argument("--repeats", type=int, default=20, help="timed repeats, median kept (default 20)")
    p.add_argument("-o", "--out", default="bench/results/attention.json", help="JSON result path")


def time_graph_ms(fn, device: torch.device, repeats: int = 20) -> float | None:
    """Median ms of replaying ``fn`` captured in a CUDA graph: device time without the host's
    launch overhead (what a graph-captured decode step pays). None on CPU or if capture fails."""
    if device.type != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        return None
    return time_ms(graph.replay, device, repeats)


def copy_gbps(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Device-to-device copy, bytes read + written per second: the bandwidth ceiling."""
    if device.type != "cuda":
        return None
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), device, repeats=10)
    return round(2 * nbytes / ms / 1e6, 1)


def make_pool(batch: int, context: int, g: int, h_kv: int, d: int, dtype, device, seed: int = 0):
    """Random pool of batch * ceil(context / G) groups; sequence b owns slots [b*N, (b+1)*N)."""
    n = -(-context // g)
    gen = torch.Generator(device=device).manual_seed(seed)
    pool = torch.randn(batch * n, 2, h_kv, g, d, generator=gen, device=device, dtype=dtype)
    last = torch.full((batch,), context - (n - 1) * g, dtype=torch.int32, device=device)
    return pool, n, last


def full_table(batch: int, n: int, h_kv: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    slots = (torch.arange(batch, device=device)[:, None] * n + torch.arange(n, device=device)).to(torch.int32)
    return slots[:, None, :].expand(batch, h_kv, n), torch.full((batch,), n, dtype=torch.int32, device=device)


def sparse_table(batch: int, n: int, h_kv: int, pages: int, device, seed: int = 1):
    """Sink group 0, the last 4 groups, random others; ascending: (B, H_kv, P) shared by heads."""
    gen = torch.Generator(device=device).manual_seed(seed)
    pages = min(pages, n)
    middle = torch.rand(batch, max(n - 5, 0), generator=gen, device=device).argsort(-1)[:, : max(pages - 5, 0)] + 1
    tail = torch.arange(max(n - 4, 1), n, device=device).expand(batch, -1)
    groups = torch.cat([torch.zeros(batch, 1, dtype=torch.int64, device=device), middle, tail], -1)
    groups = groups[:, :pages].sort(-1).values
    slots = (torch.arange(batch, device=device)[:, None] * n + groups).to(torch.int32)
    return slots[:, None, :].expand(batch, h_kv, pages), torch.full((batch,), pages, dtype=torch.int32, device=device)


def contiguous_kv(pool: torch.Tensor, batch: int, n: int):
    """(B*N, 2, H_kv, G, D) -> K, V (B, H_kv, N*G, D) for SDPA."""
    _, _, h, g, d = pool.shape
    kv = pool.view(batch, n, 2, h, g, d).permute(2, 0, 3, 1, 4, 5).reshape(2, batch, h, n * g, d)
    return kv[0], kv[1]


def sdpa_decode(q, k, v, scale):
    """GQA decode through SDPA: a KV head's R query heads become R query rows (no mask needed)."""
    b, h_q, d = q.shape
    h_kv = k.shape[1]
    out = F.scaled_dot_product_attention(q.view(b, h_kv, h_q // h_kv, d), k, v, scale=scale)
    return out.reshape(b, h_q, d)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def run_case(batch, context, args, device, dtype, peak) -> dict:
    g, h_q, h_kv, d = args.group_tokens, LLAMA["h_q"], LLAMA["h_kv"], LLAMA["d"]
    pool, n, last = make_pool(batch, context, g, h_kv, d, dtype, device)
    q = torch.randn(batch, h_q, d, device=device, dtype=dtype)
    scale = d**-0.5
    kv_bytes = lambda tokens: batch * h_kv * tokens * d * 2 * dtype.itemsize  # noqa: E731
    res = {"batch": batch, "context": context, "budget_tokens": args.budget}
    full_pt, full_np = full_table(batch, n, h_kv, device)
    sp_pt, sp_np = sparse_table(batch, n, h_kv, -(-args.budget // g), device)
    sp_last = torch.full_like(last, g)  # random middle pages are full; only the real last page is not
    sp_last = torch.where(sp_pt[:, 0, -1] == (torch.arange(batch, device=device) * n + n - 1), last, sp_last)
    use_triton = triton_available() and device.type == "cuda"
    if use_triton:
        for bt in args.block_tokens:
            res[f"full_triton_ms_bt{bt}"] = time_ms(
                lambda bt=bt: sparse_attention_triton(q, pool, full_pt, full_np, last, scale, block_tokens=bt),
                device,
                args.repeats,
            )
            res[f"sparse_triton_ms_bt{bt}"] = time_ms(
                lambda bt=bt: sparse_attention_triton(q, pool, sp_pt, sp_np, sp_last, scale, block_tokens=bt),
                device,
                args.repeats,
            )
        best = min(args.block_tokens, key=lambda bt: res[f"full_triton_ms_bt{bt}"])
        res["sparse_triton_graph_ms"] = time_graph_ms(
            lambda: sparse_attention_triton(q, pool, sp_pt, sp_np, sp_last, scale, block_tokens=best),
            device,
            args.repeats,
        )
        res["full_triton_graph_ms"] = time_graph_ms(
            lambda: sparse_attention_triton(q, pool, full_pt, full_np, last, scale, block_tokens=best),
            device,
            args.repeats,
        )
        res["full_triton_ms"], res["best_block_tokens_full"] = res[f"full_triton_ms_bt{best}"], best
        res["sparse_triton_ms"] = min(res[f"sparse_triton_ms_bt{bt}"] for bt in args.block_tokens)
        out_t, lse_t = sparse_attention_triton(q, pool, sp_pt, sp_np, sp_last, scale, block_tokens=best)
    res["sparse_ref_ms"] = time_ms(
        lambda: sparse_attention_ref(q, pool, sp_pt, sp_np, sp_last, scale), device, args.repeats
    )
    out_r, lse_r = sparse_attention_ref(q, pool, sp_pt, sp_np, sp_last, scale)
    if use_triton:
        res["sparse_out_rel_err"] = rel_err(out_t, out_r)
        res["sparse_lse_max_err"] = float((lse_t - lse_r).abs().max())
    k, v = contiguous_kv(pool, batch, n)
    k, v = k[:, :, :context], v[:, :, :context]
    res["full_sdpa_ms"] = time_ms(lambda: sdpa_decode(q, k, v, scale), device, args.repeats)
    if use_triton:
        out_f, _ = sparse_attention_triton(q, pool, full_pt, full_np, last, scale, block_tokens=best)
        res["full_out_rel_err_vs_sdpa"] = rel_err(out_f, sdpa_decode(q, k, v, scale))
    k = v = None  # free them before the next case
    res["full_kv_gb"] = round(kv_bytes(context) / 1e9, 3)
    res["sparse_kv_gb"] = round(kv_bytes(int(sp_np[0]) * g) / 1e9, 4)
    if peak:
        for key in ("full_triton_ms", "full_sdpa_ms"):
            if key in res:
                res[key.replace("_ms", "_gbps")] = round(kv_bytes(context) / res[key] / 1e6, 1)
        for key in ("sparse_triton_ms", "sparse_triton_graph_ms"):
            if res.get(key):
                res[key.replace("_ms", "_gbps")] = round(kv_bytes(int(sp_np[0]) * g) / res[key] / 1e6, 1)
    pool = None
    return res


def run(args) -> int:
    device = dev.resolve(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    peak = copy_gbps(device)
    results, notes = [], [f"argv: {' '.join(sys.argv)}"]
    if not (triton_available() and device.type == "cuda"):
        notes.append("no CUDA GPU or no triton: Triton timings skipped")
    for case in args.cases:
        batch, context = (int(x) for x in case.lower().split("x"))
        results.append(run_case(batch, context, args, device, dtype, peak))
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in results[-1].items()}, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    config = {
        "cases": args.cases,
        "group_tokens": args.group_tokens,
        "budget": args.budget,
        **LLAMA,
        "dtype": str(dtype),
        "block_tokens": args.block_tokens,
        "copy_gbps_read_plus_write": peak,
    }
    path = write_result(args.out, "attention", config, results, notes)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
