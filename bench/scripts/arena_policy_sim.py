"""Which host-arena policy needs the fewest disk reads: a replay of real selections.

Records what every layer of SmolLM2 selects at each decode step on real prose (teacher
forced, CPU, the tiered cache with the disk tier in ``defer`` mode and an arena that holds
everything, so nothing is left out and the selections are the exact path's), then replays
them against an arena of each size under two policies:

- ``lru``: what ``DiskBackedHostKV`` does: every selected group is stamped, a miss is read and
  evicts the least recently used group.
- ``lru+around K``: the same, and a miss also brings the K groups after and before it that are
  absent, in the same request (a sequence's groups of one layer lie consecutively on disk
  within a prefill chunk, so this is one larger read, not more requests).
- ``belady``: each eviction takes the group used again furthest in the future: the floor
  under any policy that reads one group per miss.

The arena starts as the LRU state after the prefill's writes (sequence by sequence). Reads are
assumed to land before the next step (an optimistic bound for ``defer``). Prints and writes
JSON: misses (groups selected but absent), requests and groups read, per step.

    python bench/scripts/arena_policy_sim.py -o bench/results/arena-policy-sim-smollm2-cpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from kvdrive.eval import corpus
from kvdrive.kv.disk_host_kv import DiskBackedHostKV
from kvdrive.kv.pool import PoolPath
from kvdrive.kv.sparse import SparseConfig
from kvdrive.kv.tiered import TieredConfig, TieredSparseKVCache
from kvdrive.models.loader import load_model


def record(model, rows: list[list[int]], prompt: int, chunk: int, group: int) -> list[list[list[set]]]:
    """Per step, per layer, per sequence: the set of groups selected (exact path)."""
    b, total = len(rows), len(rows[0])
    kv_bytes = model.config.kv_bytes_per_token(model.dtype) * (total + 8) * b
    steps: list = []
    orig = DiskBackedHostKV.take_selections

    def take(self, slot_list, layers, groups, flags, event):
        event.synchronize()
        g, f = groups.numpy(), flags.numpy()
        steps.append([[set(g[i, j][f[i, j] & 1 > 0].tolist()) for j in range(len(slot_list))]
                      for i in range(len(layers))])
        return orig(self, slot_list, layers, groups, flags, event)

    tmp = Path(tempfile.mkdtemp(prefix="kvdrive-sim-"))
    DiskBackedHostKV.take_selections = take
    try:
        cfg = TieredConfig(sparse=SparseConfig(budget=512, sink_tokens=16, window_tokens=64, group_tokens=group),
                           cache_tokens=1024, disk=(PoolPath(str(tmp), 4 * kv_bytes + (64 << 20)),),
                           host_bytes=2 * kv_bytes, disk_misses="defer")
        cache = TieredSparseKVCache(model.config, b, total + 8, model.device, model.dtype, tiered=cfg)
        ids = torch.tensor(rows, device=model.device)
        for i in range(b):
            cache.add(i, total + 8)
            for s in range(0, prompt, chunk):
                batch = cache.plan([i], min(chunk, prompt - s))
                model(ids[i : i + 1, s : s + batch.num_new], cache, batch)
                cache.commit(batch)
        for t in range(prompt, total):
            batch = cache.plan(list(range(b)), 1)
            model(ids[:, t : t + 1], cache, batch)
            cache.commit(batch)
        cache.host._drain()
        cache.close()
    finally:
        DiskBackedHostKV.take_selections = orig
        shutil.rmtree(tmp, ignore_errors=True)
    return steps


def replay(steps, batch: int, prompt: int, group: int, capacity: int, around: int) -> dict:
    """Misses, requests and groups read per step of one layer-independent arena policy."""
    layers = len(steps[0])
    misses = requests = read = 0
    for la in range(layers):
        arena: OrderedDict = OrderedDict()  # (seq, group) -> None, least recently used first

        def touch(key):
            arena.pop(key, None)
            arena[key] = None
            while len(arena) > capacity:
                arena.popitem(last=False)

        for s in range(batch):  # the prefill's writes, in order
            for g in range(prompt // group):
                touch((s, g))
        for t, step in enumerate(steps):
            for s in range(batch):
                touch((s, (prompt + t) // group))  # the group the decode token is written to
                sel = step[la][s]
                absent = sorted(g for g in sel if (s, g) not in arena)
                misses += len(absent)
                fetched: set = set()
                for g in absent:
                    if g in fetched:
                        continue
                    span = [x for x in range(g - around, g + around + 1) if x == g or (
                            0 <= x < (prompt + t) // group and (s, x) not in arena)]
                    requests += 1
                    read += len(span)
                    fetched.update(span)
                    for x in span:
                        touch((s, x))
                for g in sel:  # every selected group is stamped (LRU over what the step uses)
                    touch((s, g))
    n = len(steps)
    return {"misses_per_step": misses / n, "requests_per_step": requests / n, "groups_read_per_step": read / n}


def replay_belady(steps, batch: int, prompt: int, group: int, capacity: int) -> dict:
    """Misses per step when each eviction takes the group used again furthest in the future
    (Belady's optimum for one-group reads): the floor under any recency policy."""
    import heapq

    layers, n = len(steps[0]), len(steps)
    misses = 0
    never = n + 1
    for la in range(layers):
        uses: dict = {}  # key -> step indices it is used at (selected, or written as the open group)
        for t, step in enumerate(steps):
            for s in range(batch):
                uses.setdefault((s, (prompt + t) // group), []).append(t)
                for g in step[la][s]:
                    uses.setdefault((s, g), []).append(t)
        arena: dict = {}  # key -> its next use
        heap: list = []  # (-next use, key); stale entries skipped

        def nxt(key, now):
            times = uses.get(key, ())
            i = np.searchsorted(times, now, side="right")
            return times[i] if i < len(times) else never

        def put(key, now):
            arena[key] = nxt(key, now)
            heapq.heappush(heap, (-arena[key], key))
            while len(arena) > capacity:
                neg, victim = heapq.heappop(heap)
                if arena.get(victim) == -neg:
                    del arena[victim]

        for s in range(batch):
            for g in range(prompt // group):
                put((s, g), -1)
        for t, step in enumerate(steps):
            for s in range(batch):
                put((s, (prompt + t) // group), t)
                for g in step[la][s]:
                    if (s, g) not in arena:
                        misses += 1
                    put((s, g), t)
    return {"misses_per_step": misses / n, "requests_per_step": misses / n, "groups_read_per_step": misses / n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default="smollm2")
    p.add_argument("--text", default="persuasion-excerpt")
    p.add_argument("--prompt", type=int, default=8192)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--shares", type=float, nargs="+", default=[0.9, 0.75, 0.6, 0.5, 0.35])
    p.add_argument("--around", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("-o", "--out", required=True)
    args = p.parse_args(argv)
    group = 16
    lm = load_model(args.model)
    ids = lm.tokenizer(corpus.load_text(args.text).text, add_special_tokens=False)["input_ids"]
    span = args.prompt + args.steps
    if span * args.batch > len(ids):
        raise SystemExit(f"the text has {len(ids)} tokens, {span * args.batch} are needed")
    rows = [ids[i * span : (i + 1) * span] for i in range(args.batch)]
    t0 = time.perf_counter()
    steps = record(lm.model, rows, args.prompt, 1024, group)
    total = args.batch * (span // group)
    selected = float(np.mean([sum(len(x) for la in st for x in la) for st in steps]))
    out = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
           "model": lm.source, "text": args.text, "prompt_tokens": args.prompt, "steps": len(steps),
           "batch": args.batch, "layers": len(steps[0]), "groups_per_layer": total,
           "selected_per_step": selected, "sparse": {"budget": 512, "sink": 16, "window": 64, "group_tokens": group},
           "assumptions": "reads land before the next step; the arena policy sees every selected group; "
                          "the GPU cache in front is not modelled (its hits are stamped in the arena too)",
           "rows": []}
    for share in args.shares:
        cap = int(share * total)
        for k in args.around:
            row = {"arena_share": share, "policy": "lru" if k == 0 else f"lru+around{k}",
                   **replay(steps, args.batch, args.prompt, group, cap, k)}
            out["rows"].append(row)
            print(row, flush=True)
        row = {"arena_share": share, "policy": "belady", **replay_belady(steps, args.batch, args.prompt, group, cap)}
        out["rows"].append(row)
        print(row, flush=True)
    out["seconds"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
