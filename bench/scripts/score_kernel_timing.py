"""Time the fused group score (``kvdrive.retrieval.score_triton``) against the torch path at the
Llama-3.1-8B decode shapes (8 KV heads of 4 query heads, D=128, minmax summaries in bf16), for
several programs' sizes: a CUDA graph of 50 calls, median of 7 replays, on an idle GPU. Checks
each result against the torch path. Also prints the bandwidth of reading the summaries once.

Run on a CUDA machine from the repo root: ``python3 bench/scripts/score_kernel_timing.py``
(writes ``$OUT/scorebench.json``, or ``./scorebench.json``).
"""

import functools
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "bench", "scripts"))
from select_kernel_timing import save, time_us

from kvdrive.retrieval.score_triton import group_scores
from kvdrive.retrieval.summaries import make_summarizer


def main() -> None:
    s = make_summarizer("minmax", 8, 128, 16)
    rows = []
    for b, n in ((2, 8192), (4, 8192), (8, 2048)):
        gen = torch.Generator(device="cuda").manual_seed(b * n)
        summ = torch.randn(b, n + 64, 8, 256, generator=gen, device="cuda").to(torch.bfloat16)[
            :, :n
        ]  # padded table view
        q = torch.randn(b, 32, 128, generator=gen, device="cuda").to(torch.bfloat16)
        counts = torch.full((b,), n - 3, device="cuda")
        want = s.score(q, summ, None, 0.088, counts=counts, impl="torch")
        mb = summ.numel() * 2 / 1e6
        torch_call = functools.partial(s.score, q, summ, None, 0.088, counts=counts, impl="torch")
        row = {"b": b, "n": n, "impl": "torch", "us": time_us(torch_call)}
        rows.append(row)
        print(row, flush=True)
        for block_n in (16, 32, 64, 128):
            for warps in (2, 4, 8):
                call = functools.partial(group_scores, q, summ, counts, 0.088, 8, "max", "minmax", block_n, warps)

                got = call()
                fin = torch.isfinite(want)
                ok = bool(
                    torch.equal(torch.isinf(got), torch.isinf(want))
                    and torch.allclose(got[fin], want[fin], rtol=2e-2, atol=2e-2)
                )
                us = time_us(call)
                row = {
                    "b": b,
                    "n": n,
                    "impl": "triton",
                    "block_n": block_n,
                    "warps": warps,
                    "us": us,
                    "summary_gbps": round(mb * 1e3 / us, 1),
                    "matches_torch": ok,
                }
                rows.append(row)
                print(row, flush=True)
    save(
        "scorebench.json",
        "score_kernel_timing.py",
        "group score per call (scores of every group of every KV "
        "head), CUDA graph, idle GPU; minmax bf16 summaries (B, N, 8, 256), 32 query heads",
        rows,
    )


if __name__ == "__main__":
    main()
