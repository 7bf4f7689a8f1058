"""What the engine thread pays per step for deferred disk misses, with and without the native reader.

No model and no GPU: a ``DiskBackedHostKV`` of the SmolLM2 KV shape is filled and written to
disk, then each simulated step hands it the selections of all layers with ~``--left`` groups
left out (disk-only, chosen at random), and ``begin``/``end`` are timed: that is the host work a
decode step of ``disk_misses="defer"`` waits for, including the read path's GIL contention.
A sleep of ``--gpu-ms`` between steps stands for the GPU step the host overlaps. Both read
paths run in one process, side by side: the native batched reader (``kvdrive.storage.native_io``)
and Python threads with one task per read (``KVDRIVE_NATIVE_IO=0``).

    python bench/scripts/deferred_host_path.py --dir /path/on/the/disk -o bench/results/deferred-host-path-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kvdrive.storage import native_io
from kvdrive.storage.layout import GroupLayout
from kvdrive.storage.pool import PoolPath
from kvdrive.tiered.disk_host_kv import DiskBackedHostKV, _Done

SELECTED = 32  # groups a layer selects per sequence: budget 512 / 16-token groups


def selections(kv: DiskBackedHostKV, rng, layers: int, seqs: int, left: int):
    """(L, B, P) groups and flags of one step: resident picks, and ~``left`` disk-only ones left out."""
    groups = np.zeros((layers, seqs, SELECTED), dtype=np.int32)
    flags = np.ones((layers, seqs, SELECTED), dtype=np.uint8)
    for la in range(layers):
        resident = kv.index.slot_of[la] >= 0
        for b in range(seqs):
            r, d = np.flatnonzero(resident[b]), np.flatnonzero(~resident[b])
            k = min(len(d), rng.poisson(left / (layers * seqs)))
            groups[la, b] = np.concatenate(
                [rng.choice(r, SELECTED - k, replace=False), rng.choice(d, k, replace=False)]
            )
            flags[la, b, SELECTED - k :] = 2
    return torch.from_numpy(groups), torch.from_numpy(flags)


def run(args, native: bool) -> dict:
    saved = native_io._state.copy()
    if not native:
        native_io._state["fn"] = None
    elif native_io.reader() is None:
        raise SystemExit("the native reader is unavailable here (see the warning): nothing to compare")
    layout = GroupLayout(args.layers, 3, 64, torch.bfloat16, 16)  # SmolLM2-135M's KV
    n = args.tokens // layout.group_tokens
    total = layout.num_layers * args.seqs * n * layout.slot_bytes
    work = tempfile.mkdtemp(prefix="kvdrive-hostpath-", dir=args.dir)
    kv = DiskBackedHostKV(
        layout, args.seqs, n, torch.device("cpu"), int(total * args.arena), (PoolPath(work, int(total * 1.2)),)
    )
    try:
        seqs = list(range(args.seqs))
        for st in range(0, args.tokens, 1024):  # fill: every group written behind to disk
            kv.begin(seqs, (st,) * args.seqs, 1024)
            kv.end(seqs, (st,) * args.seqs, 1024, _Done())
        kv._reap(wait_all=True)
        rng = np.random.default_rng(args.seed)
        kv.reset_counts()
        host_s = []
        t0 = time.perf_counter()
        for t in range(args.steps):
            groups, flags = selections(kv, rng, layout.num_layers, args.seqs, args.left)
            kv.take_selections(seqs, list(range(layout.num_layers)), groups, flags, _Done())
            starts = (args.tokens - args.steps - 1 + t,) * args.seqs
            h0 = time.perf_counter()
            kv.begin(seqs, starts, 1)
            kv.end(seqs, starts, 1, _Done())
            host_s.append(time.perf_counter() - h0)
            time.sleep(args.gpu_ms / 1e3)
        wall = time.perf_counter() - t0
        c = kv.stats()
    finally:
        kv.close()
        os.rmdir(work)
        native_io._state.clear()
        native_io._state.update(saved)
    ms = np.asarray(host_s) * 1e3
    return {
        "read_path": "native" if native else "python_threads",
        "host_ms_per_step_median": float(np.median(ms)),
        "host_ms_per_step_mean": float(ms.mean()),
        "host_ms_per_step_p90": float(np.percentile(ms, 90)),
        "deferred_per_step": c["deferred"] / args.steps,
        "deferred_reads_per_step": c["deferred_reads"] / args.steps,
        "reads_landed_per_s": c["deferred_reads"] / wall,
        "host_us_per_deferred_read": float(ms.mean() * 1e3 / max(c["deferred"] / args.steps, 1)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=tempfile.gettempdir(), help="directory on the disk to test (default: the temp dir)")
    p.add_argument("--seqs", type=int, default=16, help="sequences (default 16)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per sequence (default 8192)")
    p.add_argument("--layers", type=int, default=30, help="layers (default 30, SmolLM2-135M)")
    p.add_argument("--arena", type=float, default=0.6, help="host arena as a share of the KV (default 0.6)")
    p.add_argument("--left", type=int, default=800, help="groups left out per step, all layers (default 800)")
    p.add_argument("--steps", type=int, default=40, help="timed steps (default 40)")
    p.add_argument("--gpu-ms", type=float, default=5.0, help="sleep per step standing for the GPU step (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", required=True)
    args = p.parse_args(argv)
    rows = []
    for native in (True, False):
        rows.append(run(args, native))
        print(rows[-1], flush=True)
    out = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "environment": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.node()},
        "config": vars(args),
        "rows": rows,
        "ratio_host_ms_python_over_native": rows[1]["host_ms_per_step_median"] / rows[0]["host_ms_per_step_median"],
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
