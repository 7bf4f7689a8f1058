"""Time the shared-mode selection launcher with one program per sequence (chunk 0) and with the
split kernels (chunk 1024), at the Llama-3.1-8B decode shapes (8 KV heads, budget 2048 tokens,
16-token groups): a CUDA graph of 50 calls, allocations included, median of 7 replays. Checks
each result against the torch path.

Run on a CUDA machine from the repo root: ``python3 bench/scripts/select_kernel_timing.py``
(writes ``$OUT/selbench.json``, or ``./selbench.json``).
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from kvdrive.retrieval.select import Budget, SelectionConfig, _select_kernel, select_groups

CFG = SelectionConfig(Budget(tokens=2048), n_sink=4, n_window=16, mode="shared")


def time_us(call) -> float:
    g, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream):
        call()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            for _ in range(50):
                call()
    times = []
    for _ in range(7):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1000 / 50)
    return round(sorted(times)[3], 2)


def main() -> None:
    rows = []
    for b, n in ((2, 8192), (4, 8192), (8, 2048), (16, 2048)):
        gen = torch.Generator(device="cuda").manual_seed(b * n)
        scores = torch.randn(b, 8, n, generator=gen, device="cuda")
        num_groups = torch.randint(n - 64, n + 1, (b,), generator=gen, device="cuda")
        want = select_groups(scores, num_groups, CFG, 16, max_pages=128, impl="torch")
        for chunk in (0, 1024):

            def call(scores=scores, num_groups=num_groups, chunk=chunk):
                return _select_kernel(scores, num_groups, CFG, 16, 128, chunk=chunk)

            got, _ = call()
            ok = bool(torch.equal(got.groups, want.groups) and torch.equal(got.num_pages, want.num_pages))
            row = {"b": b, "n": n, "chunk": chunk, "us": time_us(call), "matches_torch": ok}
            print(row, flush=True)
            rows.append(row)
    save(
        "selbench.json",
        "select_kernel_timing.py",
        "selection launcher time per call, CUDA graph, 8 KV heads, "
        "budget 2048 tokens, G=16; chunk 0 = one program per sequence",
        rows,
    )


def save(name: str, script: str, what: str, rows: list[dict]) -> None:
    """A timing script's rows as ``$OUT/name`` (or ``./name``), with its command and the GPU."""
    doc = {
        "command": f"python3 bench/scripts/{script}",
        "device": torch.cuda.get_device_name(),
        "what": what,
        "rows": rows,
    }
    with open(os.path.join(os.environ.get("OUT", "."), name), "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
