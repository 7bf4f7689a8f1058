"""``kvdrive bench faults``: every injected fault across prefix reuse and tiered decode, each
trial's outputs compared token for token with a clean run.

For each fault kind (``kvdrive.storage.faults``) and workload, ``trials`` runs with seeds 0, 1, ... under
``KVDRIVE_FAULTS``; SmolLM2-135M on the CPU, greedy, short prompts:

  prefix        an LLM with a prefix pool (a disk, and a host arena that takes 1 chunk in 20):
                three prompts that share a two-chunk prefix, each generated twice (stored, then
                loaded); the reference is an LLM without a pool.
  tenants       two LLMs sharing one pool as tenants "a" and "b", the same prompts each.
  tiered-wait   the tiered cache over a disk behind an arena smaller than the batch's KV (two
                sequences: the first's groups are evicted and read back); the reference is
                the same tiered run without faults.
  tiered-defer  disk_misses="defer" with an arena that holds every group (where deferred
                reads would otherwise make the run depend on timing), same reference.

A row counts: trials, faults fired, trials with outputs identical to the reference, slot
reads recovered by the retry, prefix chunks recomputed, stores skipped, surfaced errors (a
``KvdriveError``, one line), degraded trials (outputs differ and a loss was reported: the
tiered cache's ``lost`` groups), wrong trials (outputs differ and nothing was reported: must be
0), and bytes leaked (files left after ``close`` that are not the pool's own). Any other
exception is a bug and stops the campaign.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict

from kvdrive.bench.reliability.workloads import (
    POOL_FILES,
    PREFIX_PROMPTS,
    Row,
    greedy,
    injected,
    recovered,
    tiered_outputs,
)
from kvdrive.errors import KvdriveError
from kvdrive.storage import faults as fault_layer

FAULTS = {  # kind -> KVDRIVE_FAULTS text (the trial's seed is added)
    "eio": "eio=0.1",
    "short": "short=0.1",
    "torn": "torn=0.1",
    "flip": "flip=0.1",
    "latency": "latency=0.1:5",
    "enospc": "enospc=1",
    "efbig": "efbig=1",
    "vanish": "vanish=20",
    "nomem": "nomem=1",
    "mixed": "eio=0.05,short=0.05,torn=0.05,flip=0.05,latency=0.05:5",
}
WORKLOADS = ("prefix", "tenants", "tiered-wait", "tiered-defer")


def reference(loaded, workload: str) -> list:
    """``workload``'s clean outputs (token ids per generate call)."""
    from kvdrive.engine.llm import LLM

    if workload in ("prefix", "tenants"):
        with LLM(loaded=loaded) as cold:
            prefix = [cold.generate([p], greedy(4))[0].token_ids for p in PREFIX_PROMPTS for _ in range(2)]
        return prefix if workload == "prefix" else prefix * 2
    with tempfile.TemporaryDirectory() as d, injected(None):
        return tiered_outputs(loaded, d, workload == "tiered-defer")[0]


def _prefix_outputs(loaded, path: str, tenants: bool):
    from kvdrive.engine.llm import LLM
    from kvdrive.models.identity import weights_digest
    from kvdrive.prefix.pool import PrefixConfig, PrefixPool
    from kvdrive.storage.pool import PoolPath

    # a host arena (the nomem faults hit it) that takes a small share: loads read the disk
    cfg = PrefixConfig(
        disks=(PoolPath(path, 16 << 20),), host_bytes=1 << 20, host_weight=0.05, chunk_tokens=16, admit_after=1
    )
    if not tenants:
        with LLM(loaded=loaded, prefix_cache=cfg) as llm:
            outs = [llm.generate([p], greedy(4))[0].token_ids for p in PREFIX_PROMPTS for _ in range(2)]
            return outs, _pool_counts(llm.prefix)
    pool = PrefixPool(loaded.config, loaded.model.dtype, cfg, weights=weights_digest(loaded.model))
    try:
        outs = []
        for tenant in ("a", "b"):
            with LLM(loaded=loaded, prefix_cache=pool, tenant=tenant) as llm:
                outs += [llm.generate([p], greedy(4))[0].token_ids for p in PREFIX_PROMPTS for _ in range(2)]
        return outs, _pool_counts(pool)
    finally:
        pool.close()


def _pool_counts(pool) -> tuple[int, int, int]:
    s = pool.stats()
    devices = pool.pool.devices if pool.pool is not None else []
    return s.corrupt_chunks, s.store_skipped, recovered(devices)


def trial(loaded, workload: str, fault: str, seed: int, reference: list, row: Row) -> None:
    """One run of ``workload`` under ``fault`` with ``seed``, counted into ``row``."""
    before = sum(fault_layer.fired().values())
    with tempfile.TemporaryDirectory() as d:
        try:
            with injected(f"seed={seed},{FAULTS[fault]}"):
                if workload.startswith("tiered"):
                    outs, lost, recovered = tiered_outputs(loaded, d, workload == "tiered-defer")
                    recomputed = skipped = 0
                else:
                    outs, (recomputed, skipped, recovered) = _prefix_outputs(loaded, d, workload == "tenants")
                    lost = 0
        except KvdriveError as err:
            row.surfaced += 1
            row.errors = tuple(sorted({*row.errors, str(err)[:120]}))
            outs = None
        row.leaked_bytes += sum(
            os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if not f.startswith(POOL_FILES)
        )
    row.trials += 1
    row.fired += sum(fault_layer.fired().values()) - before
    if outs is None:
        return
    row.recovered_reads += recovered
    row.recomputed_chunks += recomputed
    row.skipped_stores += skipped
    if outs == reference:
        row.identical += 1
    elif lost:
        row.degraded += 1
    else:
        row.wrong += 1


def campaign(
    loaded, trials: int, tiered_trials: int, workloads=WORKLOADS, kinds=tuple(FAULTS), progress=print
) -> list[Row]:
    rows = []
    for workload in workloads:
        ref = reference(loaded, workload)
        for fault in kinds:
            row = Row(workload, fault)
            for seed in range(tiered_trials if workload.startswith("tiered") else trials):
                trial(loaded, workload, fault, seed, ref, row)
            progress(f"{workload:13s} {fault:8s} {asdict(row)}")
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The rows as the markdown table of docs/reliability.md."""
    head = [
        "workload",
        "fault",
        "trials",
        "faults fired",
        "outputs identical",
        "reads recovered",
        "chunks recomputed",
        "stores skipped",
        "surfaced errors",
        "degraded (reported)",
        "wrong outputs",
        "bytes leaked",
    ]
    keys = [
        "workload",
        "fault",
        "trials",
        "fired",
        "identical",
        "recovered_reads",
        "recomputed_chunks",
        "skipped_stores",
        "surfaced",
        "degraded",
        "wrong",
        "leaked_bytes",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--trials", type=int, default=5, help="runs per fault kind of the prefix workloads (default 5)")
    p.add_argument("--tiered-trials", type=int, default=2, help="runs per fault kind of the tiered ones (default 2)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--faults", nargs="+", default=list(FAULTS), choices=list(FAULTS))
    p.add_argument("--kills", type=int, default=60, help="kill -9 trials of a store/evict loop (default 60)")
    p.add_argument("--processes", type=int, default=3, help="processes sharing one pool directory (default 3)")
    p.add_argument("-o", "--out", default="bench/results/faults-smollm2-cpu.json")


def run(args) -> int:
    from kvdrive.bench.reliability import crash
    from kvdrive.models.loader import load_model
    from kvdrive.results import write_result

    loaded = load_model("smollm2", device="cpu", dtype="float32")
    rows = [asdict(r) for r in campaign(loaded, args.trials, args.tiered_trials, args.workloads, args.faults)]
    with tempfile.TemporaryDirectory() as d:
        rows.append(asdict(crash.kill_trials(args.kills, d)))
        print(rows[-1])
    with tempfile.TemporaryDirectory() as d:
        rows.append(asdict(crash.process_trials(args.processes, d)))
        print(rows[-1])
    for workload in ("prefix", "tiered-wait"):
        row = crash.full_filesystem(loaded, workload)
        if row is not None:
            rows.append(asdict(row))
            print(rows[-1])
    print(table(rows))
    bad = [r for r in rows if r["wrong"] or r["leaked_bytes"]]
    path = write_result(
        args.out,
        "faults",
        {
            "trials": args.trials,
            "tiered_trials": args.tiered_trials,
            "kills": args.kills,
            "processes": args.processes,
            "faults": FAULTS,
            "model": "smollm2 (SmolLM2-135M-Instruct, CPU, float32, greedy)",
        },
        rows,
    )
    print(f"{len(rows)} rows, {sum(r['trials'] for r in rows)} trials, wrong or leaking rows: {len(bad)} -> {path}")
    return 1 if bad else 0
