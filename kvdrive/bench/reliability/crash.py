"""Crashes and contention for ``kvdrive bench faults``: kill -9 in the middle of a prefix
pool's stores and evictions, several processes on one pool directory, a file system that
fills up.

The crash trials use a small pool (3 layers, 4-token chunks, room for 6 chunks: it evicts
all the time) whose KV is a function of each token and its position (``kv_of``), so after
any restart every chunk that loads can be checked against what it must hold.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import types

import torch

from kvdrive.bench.reliability.workloads import (
    POOL_FILES,
    PREFIX_PROMPTS,
    TIERED_PROMPTS,
    Row,
    greedy,
    injected,
    tiered_config,
    tiered_outputs,
)
from kvdrive.errors import KvdriveError

CFG = types.SimpleNamespace(
    num_hidden_layers=3,
    num_key_value_heads=2,
    head_dim=8,
    sliding_windows=(None,) * 3,
    attn_scale=1.0,
    attn_logit_softcap=None,
)
C = 4  # chunk tokens
CHUNK_BYTES = 3 * 4096  # one 4 KiB slot per layer
BUDGET = 6 * CHUNK_BYTES
PROMPTS = 12
_PRIVATE = re.compile(r"^kvdrive-\d+-[0-9a-f]{8}")


def prompt(i: int) -> list[int]:
    """Prompt ``i``: one of three shared openings, then its own tokens (1-3 chunks more)."""
    return [100 + i % 3] * C + [1000 + 50 * i + t for t in range(C * (1 + i % 3) + 1)]


def kv_of(ids: list[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The KV a model would give ``ids`` at ``layer``: (1, H_kv, T, D) each, from token and position."""
    t = (
        torch.tensor(ids, dtype=torch.float32)[None, None, :, None] * 0.37
        + torch.arange(len(ids), dtype=torch.float32)[None, None, :, None] * 0.011
    )
    h = torch.arange(CFG.num_key_value_heads, dtype=torch.float32)[None, :, None, None]
    d = torch.arange(CFG.head_dim, dtype=torch.float32)[None, None, None, :]
    return torch.sin(t * (layer + 1) + h + 0.1 * d), torch.cos(t * (layer + 1) - h + 0.2 * d)


def open_pool(path: str):
    from kvdrive.prefix.pool import PrefixConfig, PrefixPool
    from kvdrive.storage.pool import PoolPath

    return PrefixPool(
        CFG,
        torch.float32,
        PrefixConfig(
            model="crash-test",
            disks=(PoolPath(path, BUDGET),),
            chunk_tokens=C,
            admit_after=1,
            extent_bytes=2 * CHUNK_BYTES,
        ),
    )


def _cache(ids: list[int] | None):
    """A plain cache with sequence 0 holding ``ids``' KV (None: empty) and sequence 1 empty."""
    from kvdrive.cache.contiguous import ContiguousKVCache

    cache = ContiguousKVCache(CFG, 2, 64, torch.device("cpu"), torch.float32)
    cache.add(0, 64)
    cache.add(1, 64)
    if ids:
        batch = cache.plan([0], len(ids))
        for layer in range(CFG.num_hidden_layers):
            cache.append(layer, *kv_of(ids, layer), batch)
        cache.commit(batch)
    return cache


def check_loads(pool) -> tuple[int, int]:
    """Load every prompt into an empty sequence: (chunks loaded, loads whose KV is not the prompt's)."""
    loaded = wrong = 0
    for i in range(PROMPTS):
        ids, cache = prompt(i), _cache(None)
        n = pool.load(None, cache, 1, ids)
        loaded += n // C
        for layer in range(CFG.num_hidden_layers):
            k, v = cache.export_kv(1, layer, 0, n)
            want_k, want_v = kv_of(ids, layer)
            if not (torch.equal(k, want_k[0, :, :n]) and torch.equal(v, want_v[0, :, :n])):
                wrong += 1
                break
    return loaded, wrong


def store_loop(path: str, seed: int) -> None:
    """Child of a kill trial: store (and so evict) and load prompts until killed."""
    import warnings

    warnings.simplefilter("ignore")
    pool = open_pool(path)
    rng = random.Random(seed)
    print("ready", flush=True)
    while True:
        ids = prompt(rng.randrange(PROMPTS))
        pool.store(_cache(ids), 0, ids)
        if rng.random() < 0.2 and check_loads(pool)[1]:
            sys.exit(3)


def _index_rows(path: str) -> int:
    import sqlite3

    file = os.path.join(path, "kvdrive-prefix.sqlite")
    if not os.path.exists(file):
        return 0
    db = sqlite3.connect(file)
    try:
        return db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    finally:
        db.close()


def _child(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def kill_trials(n: int, root: str, seed: int = 0) -> Row:
    """``n`` times: a child stores and evicts in a loop, is killed with SIGKILL after a random
    delay, and the pool is reopened here: every chunk that loads must hold its prompt's KV,
    the disk must stay under its budget, the lock must be free and no stray file left."""
    import warnings

    row = Row("prefix pool: store/evict loop", "kill -9")
    rng = random.Random(seed)
    path = os.path.join(root, "pool")
    os.makedirs(path, exist_ok=True)
    for t in range(n):
        child = _child(f"from kvdrive.bench.reliability.crash import store_loop; store_loop({path!r}, {t})")
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the store loop did not start: {child.communicate()[1][-2000:]}")
        time.sleep(rng.uniform(0.02, 0.5))
        child.kill()
        _, err = child.communicate()
        if child.returncode != -9:  # it stopped on its own: a wrong load (3) or a bug
            raise RuntimeError(f"the store loop exited with {child.returncode}: {err[-2000:]}")
        rows = _index_rows(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pool = open_pool(path)
            try:
                row.recomputed_chunks += rows - pool.stats().index_chunks  # rows dropped at the restore
                _, wrong = check_loads(pool)
                row.recomputed_chunks += pool.stats().corrupt_chunks
                row.leaked_bytes += max(0, pool.stats().disk_physical_bytes - BUDGET)
                ids = prompt(t % PROMPTS)
                pool.store(_cache(ids), 0, ids)  # and it goes on storing
            finally:
                pool.close()
        row.leaked_bytes += sum(
            os.path.getsize(os.path.join(path, f))
            for f in os.listdir(path)
            if _PRIVATE.match(f) or not f.startswith(POOL_FILES)
        )
        row.trials += 1
        row.fired += 1
        row.identical += wrong == 0
        row.wrong += wrong > 0
    return row


def contend(path: str, k: int, rounds: int) -> None:
    """Child of a process trial: ``rounds`` times open the shared pool (retrying while another
    process owns it), store prompt ``k`` and check every load, close; prints its counts."""
    import warnings

    warnings.simplefilter("ignore")
    refusals = wrong = 0
    for r in range(rounds):
        while True:
            try:
                pool = open_pool(path)
                break
            except KvdriveError as err:
                if "in use" not in str(err):
                    raise
                refusals += 1
                time.sleep(0.02)
        try:
            ids = prompt((k + r * 5) % PROMPTS)
            pool.store(_cache(ids), 0, ids)
            wrong += check_loads(pool)[1]
        finally:
            pool.close()
    print(json.dumps({"refusals": refusals, "wrong": wrong}), flush=True)


def process_trials(n: int, root: str, rounds: int = 5) -> Row:
    """``n`` processes open, use and close one pool directory ``rounds`` times each, at once: a
    second opener is refused (one line) and retries; no load may hold another prompt's KV."""
    row = Row("prefix pool: processes on one directory", f"{n} processes")
    path = os.path.join(root, "shared")
    os.makedirs(path, exist_ok=True)
    children = [
        _child(f"from kvdrive.bench.reliability.crash import contend; contend({path!r}, {k}, {rounds})")
        for k in range(n)
    ]
    for child in children:
        out, err = child.communicate(timeout=600)
        if child.returncode:
            raise RuntimeError(f"a contending process failed: {err[-2000:]}")
        counts = json.loads(out.strip().splitlines()[-1])
        row.trials += rounds
        row.surfaced += counts["refusals"]
        row.wrong += counts["wrong"]
        row.identical += rounds if counts["wrong"] == 0 else 0
    row.fired = row.surfaced
    return row


def full_filesystem(loaded, workload: str, size: str = "2m") -> Row | None:
    """``workload`` ("prefix" or "tiered-wait") on a tmpfs of ``size`` under a disk budget of
    64 MiB: the file system fills up. None where a tmpfs cannot be mounted (not root)."""
    from kvdrive.engine.llm import LLM
    from kvdrive.prefix.pool import PrefixConfig
    from kvdrive.storage.pool import PoolPath

    with tempfile.TemporaryDirectory() as mnt:
        if subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt], capture_output=True, check=False
        ).returncode:
            return None
        row = Row(workload, f"full file system ({size} tmpfs)")
        try:
            with injected(None):
                if workload == "prefix":
                    prompts = [f"Letter {i}: " + PREFIX_PROMPTS[i % 3] for i in range(4)]  # 12 chunks: 8.4 MiB
                    with LLM(loaded=loaded) as cold:
                        want = [cold.generate([p], greedy(4))[0].token_ids for p in prompts]
                    cfg = PrefixConfig(disks=(PoolPath(mnt, 64 << 20),), chunk_tokens=16, admit_after=1)
                    with LLM(loaded=loaded, prefix_cache=cfg) as llm:
                        got = [llm.generate([p], greedy(4))[0].token_ids for p in prompts for _ in range(2)]
                        row.skipped_stores = llm.prefix.stats().store_skipped
                        row.fired = 1 if llm.prefix.pool.devices[0].full_reason else 0
                    row.trials, row.identical = 1, int(got == [w for w in want for _ in range(2)])
                    row.wrong = 1 - row.identical
                else:
                    with tempfile.TemporaryDirectory() as d:
                        want = tiered_outputs(loaded, d, False)[0]
                    cfg = tiered_config(mnt, defer=False)
                    row.trials = 1
                    try:
                        with LLM(loaded=loaded, kv_cache=cfg, max_batch=2) as llm:
                            got = [o.token_ids for o in llm.generate(TIERED_PROMPTS, greedy(6))]
                        row.identical = int(got == want)
                        row.wrong = 1 - row.identical
                    except KvdriveError as err:
                        row.surfaced, row.errors = 1, (str(err)[:120],)
            row.leaked_bytes = sum(
                os.path.getsize(os.path.join(mnt, f)) for f in os.listdir(mnt) if not f.startswith(POOL_FILES)
            )
        finally:
            subprocess.run(["umount", mnt], check=False)
        return row
