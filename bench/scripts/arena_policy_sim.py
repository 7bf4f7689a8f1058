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
import heapq
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from defer_agreement import add_row, prose_rows, run, write_out  # this directory is on sys.path when run as a script

from kvdrive.cache.sparse import SparseConfig
from kvdrive.models.loader import load_model
from kvdrive.storage.pool import PoolPath
from kvdrive.tiered.cache import TieredConfig
from kvdrive.tiered.disk_host_kv import DiskBackedHostKV


def record(model, rows: list[list[int]], prompt: int, chunk: int, group: int) -> tuple[list, list]:
    """Per step, per layer, per sequence: the set of groups selected (exact path); and per layer,
    per sequence, the importance of each prompt group as placement ranks it (the prompt's last
    query, ``TieredSparseKVCache.importance``)."""
    b, total = len(rows), len(rows[0])
    kv_bytes = model.config.kv_bytes_per_token(model.dtype) * (total + 8) * b
    steps: list = []
    keys: list = []
    orig = DiskBackedHostKV.take_selections

    def importance(cache):
        slots = torch.tensor([cache.seqs.slot(i) for i in range(b)], device=cache.device)
        for layer in sorted(cache.caches):
            q = cache.prefill.queries(slots.tolist(), layer)
            key, counts = cache.importance(layer, q, slots)
            keys.append([key[i, : counts[i]] for i in range(b)])

    def take(self, slot_list, layers, groups, flags, event):
        event.synchronize()
        g, f = groups.numpy(), flags.numpy()
        steps.append(
            [[set(g[i, j][f[i, j] & 1 > 0].tolist()) for j in range(len(slot_list))] for i in range(len(layers))]
        )
        return orig(self, slot_list, layers, groups, flags, event)

    tmp = Path(tempfile.mkdtemp(prefix="kvdrive-sim-"))
    DiskBackedHostKV.take_selections = take
    try:
        cfg = TieredConfig(
            sparse=SparseConfig(budget=512, sink_tokens=16, window_tokens=64, group_tokens=group),
            cache_tokens=1024,
            disk=(PoolPath(str(tmp), 4 * kv_bytes + (64 << 20)),),
            host_bytes=2 * kv_bytes,
            disk_misses="defer",
        )
        run(model, cfg, rows, prompt, chunk, importance, place=False)  # defer_agreement's teacher-forced decode
    finally:
        DiskBackedHostKV.take_selections = orig
        shutil.rmtree(tmp, ignore_errors=True)
    return steps, keys


class LruArena:
    """What ``DiskBackedHostKV`` does: every use stamps a group; a miss is read (with its
    ``around`` absent neighbours, in one request) and evicts the least recently used."""

    def __init__(self, capacity: int, around: int):
        self.capacity, self.around = capacity, around
        self.keys: OrderedDict = OrderedDict()  # (seq, group) -> None, least recently used first

    def __contains__(self, key) -> bool:
        return key in self.keys

    def use(self, key, now: int) -> None:
        self.keys.pop(key, None)
        self.keys[key] = None
        while len(self.keys) > self.capacity:
            self.keys.popitem(last=False)

    def serve(self, seq: int, sel: set, now: int, written: int) -> tuple[int, int, int]:
        """One sequence's selection of a step (``written``: groups below it exist); (misses,
        requests, groups read)."""
        absent = sorted(g for g in sel if (seq, g) not in self)
        requests = read = 0
        fetched: set = set()
        for g in absent:
            if g in fetched:
                continue
            span = [
                x
                for x in range(g - self.around, g + self.around + 1)
                if x == g or (0 <= x < written and (seq, x) not in self)
            ]
            requests += 1
            read += len(span)
            fetched.update(span)
            for x in span:
                self.use((seq, x), now)
        for g in sel:  # every selected group is used (LRU over what the step uses)
            self.use((seq, g), now)
        return len(absent), requests, read


class BeladyArena:
    """Each eviction takes the group used again furthest in the future (Belady's optimum for
    one-group reads): the floor under any recency policy. ``uses``: key -> sorted use steps."""

    def __init__(self, capacity: int, uses: dict, never: int):
        self.capacity, self.uses, self.never = capacity, uses, never
        self.next: dict = {}  # key -> its next use
        self.heap: list = []  # (-next use, key); stale entries skipped

    def __contains__(self, key) -> bool:
        return key in self.next

    def use(self, key, now: int) -> None:
        times = self.uses.get(key, ())
        i = np.searchsorted(times, now, side="right")
        self.next[key] = times[i] if i < len(times) else self.never
        heapq.heappush(self.heap, (-self.next[key], key))
        while len(self.next) > self.capacity:
            neg, victim = heapq.heappop(self.heap)
            if self.next.get(victim) == -neg:
                del self.next[victim]

    def serve(self, seq: int, sel: set, now: int, written: int) -> tuple[int, int, int]:
        misses = 0
        for g in sel:
            misses += (seq, g) not in self
            self.use((seq, g), now)
        return misses, misses, misses


def uses_of(steps, layer: int, batch: int, prompt: int, group: int) -> dict:
    """(seq, group) -> the steps that use it in ``layer``: selected, or written as the open group."""
    uses: dict = {}
    for t, step in enumerate(steps):
        for s in range(batch):
            uses.setdefault((s, (prompt + t) // group), []).append(t)
            for g in step[layer][s]:
                uses.setdefault((s, g), []).append(t)
    return uses


def initial_order(batch: int, prompt: int, group: int, keys=None) -> list:
    """The prompt's groups, least recently used first, as the arena holds them when decoding
    starts: in the prefills' write order, or (``keys``: one layer's importance per sequence)
    as ``DiskBackedHostKV.place`` ranks them: by rank within the sequence, all sequences
    interleaved."""
    if keys is None:
        return [(s, g) for s in range(batch) for g in range(prompt // group)]
    prio = [((np.argsort(np.argsort(k, kind="stable")) + 1) / (len(k) + 1), s) for s, k in enumerate(keys)]
    flat = [(p, s, g) for pr, s in prio for g, p in enumerate(pr)]
    return [(s, g) for _, s, g in sorted(flat)]


FIRST = 32  # steps counted apart: what the arena's initial content costs


def replay(steps, batch: int, prompt: int, group: int, make_arena, keys=None) -> dict:
    """Misses, requests and groups read per step with ``make_arena(layer)``'s policy in every
    layer (``keys``: per layer, the arena starts as ``place`` leaves it)."""
    misses = requests = read = first = 0
    placed = 0
    for la in range(len(steps[0])):
        arena = make_arena(la)
        for key in initial_order(batch, prompt, group, None if keys is None else keys[la]):
            arena.use(key, -1)
        if keys is not None:  # what placement reads: its content that the prefills' order evicted
            plain = make_arena(la)
            for key in initial_order(batch, prompt, group):
                plain.use(key, -1)
            placed += sum(1 for key in arena.keys if key not in plain)
        for t, step in enumerate(steps):
            written = (prompt + t) // group  # the group the decode token is written to
            for s in range(batch):
                arena.use((s, written), t)
                m, r, n = arena.serve(s, step[la][s], t, written)
                misses, requests, read = misses + m, requests + r, read + n
                first += m if t < FIRST else 0
    n = len(steps)
    return {
        "misses_per_step": misses / n,
        "requests_per_step": requests / n,
        "groups_read_per_step": read / n,
        f"misses_per_step_first_{FIRST}": first / min(n, FIRST),
        f"misses_per_step_after_{FIRST}": (misses - first) / max(n - FIRST, 1),
        **({"placement_reads": placed} if keys is not None else {}),
    }


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
    span = args.prompt + args.steps
    rows = prose_rows(lm, args.text, span, args.batch)
    t0 = time.perf_counter()
    steps, keys = record(lm.model, rows, args.prompt, 1024, group)
    total = args.batch * (span // group)
    selected = float(np.mean([sum(len(x) for la in st for x in la) for st in steps]))
    out = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "model": lm.source,
        "text": args.text,
        "prompt_tokens": args.prompt,
        "steps": len(steps),
        "batch": args.batch,
        "layers": len(steps[0]),
        "groups_per_layer": total,
        "selected_per_step": selected,
        "sparse": {"budget": 512, "sink": 16, "window": 64, "group_tokens": group},
        "assumptions": "reads land before the next step; the arena policy sees every selected group; "
        "the GPU cache in front is not modelled (its hits are stamped in the arena too)",
        "rows": [],
    }
    for share in args.shares:
        cap = int(share * total)
        for k in args.around:
            row = {
                "arena_share": share,
                "policy": "lru" if k == 0 else f"lru+around{k}",
                **replay(steps, args.batch, args.prompt, group, lambda la, cap=cap, k=k: LruArena(cap, k)),
            }
            add_row(out, row)
        row = {
            "arena_share": share,
            "policy": "lru, placed by importance",
            **replay(steps, args.batch, args.prompt, group, lambda la, cap=cap: LruArena(cap, 0), keys),
        }
        add_row(out, row)
        belady = replay(
            steps,
            args.batch,
            args.prompt,
            group,
            lambda la, cap=cap: BeladyArena(cap, uses_of(steps, la, args.batch, args.prompt, group), len(steps) + 1),
        )
        row = {"arena_share": share, "policy": "belady", **belady}
        add_row(out, row)
    write_out(out, args.out, t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
