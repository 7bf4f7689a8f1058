"""``kvdrive bench <name>``: one benchmark module per question.

Each benchmark module has ``add_arguments(parser)`` and ``run(args) -> int`` and
writes a JSON result (config, environment, numbers) with the command line that
produced it. Modules import lazily so ``kvdrive --help`` stays cheap.
"""

from __future__ import annotations

import importlib

__all__ = ["BENCHES", "add_parser"]

# name -> (module, one-line help)
BENCHES = {
    "model": ("kvdrive.bench.model", "decode tokens/s of the plain GPU cache vs transformers generate"),
    "select": ("kvdrive.bench.select", "time to score and select groups vs the attention time it saves"),
    "attention": ("kvdrive.bench.attention", "sparse paged attention (Triton vs torch) vs full attention"),
    "ttft": (
        "kvdrive.bench.reuse.ttft",
        "time to first token of a repeated long prompt: recompute vs serial buffered load vs kvdrive's pooled load",
    ),
    "remote": (
        "kvdrive.bench.reuse.remote",
        "time to first token of a prefix from the remote tier (Mooncake Store, "
        "written by another process) vs the local disk vs recompute, beside transfer_engine_bench",
    ),
    "prefill": (
        "kvdrive.bench.prefill",
        "prefill tokens/s and TFLOP/s of the plain (paged) and tiered caches vs "
        "transformers' forward (sdpa) on the same weights",
    ),
    "decode": (
        "kvdrive.bench.decode",
        (
            "decode tokens/s of every KV placement side by side (all-GPU, "
            "transformers offload, streaming, sparse from host, kvdrive) with each "
            "row's roofline bound"
        ),
    ),
    "io": ("kvdrive.bench.io", "host<->GPU row copy and disk read bandwidth vs the hardware's raw figures"),
    "serve": (
        "kvdrive.bench.serving.run",
        "an open-loop load (Poisson arrivals, shared prefixes and random prompts) "
        "against kvdrive serve, prefix pool off and on, and transformers serve: TTFT, inter-token latency, "
        "tokens/s, prefix hits, errors",
    ),
    "suite": (
        "kvdrive.bench.suite",
        "run a named set of the benchmarks above (headline: regenerate the README's results on a GPU)",
    ),
    "faults": (
        "kvdrive.bench.reliability.faults",
        "injected faults, kill -9 and contention across prefix reuse and "
        "tiered decode, outputs compared with clean runs (docs/reliability.md)",
    ),
    "soak": (
        "kvdrive.bench.reliability.soak",
        "thousands of generate calls with the disk tier: RSS, fds, threads "
        "and disk bytes over time, and what is left on disk after exit",
    ),
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark and write its JSON result",
        description="Benchmarks. Each writes JSON (config, environment, results, the command) to --out.",
    )
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    for name, (module, help_text) in BENCHES.items():
        bp = bsub.add_parser(name, help=help_text, description=help_text)
        bp.set_defaults(func=_runner(module))
        importlib.import_module(module).add_arguments(bp)


def _runner(module: str):
    def run(args) -> int:
        return importlib.import_module(module).run(args)

    return run
