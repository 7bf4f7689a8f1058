"""Where the prefix pool's chunks live: slots restored at open, placed at store, freed.

``restore`` hands each disk the slots its index rows name at open; ``store_chunks`` admits
a prompt's new chunks and places them (a disk by smooth weighted round-robin, a
bandwidth-proportional share and what the disks did not take in the host arena); the
``*_room`` functions evict least recently used chunks to make room; ``commit_disk`` names
written chunks in the index; ``drop`` forgets a chunk that failed a read.

Invariants: an index row never names a freed slot (data is synced before its row is
inserted, a row is removed before its slots are freed, so a crash leaves neither a row
without its data nor one over reused slots); a chunk of the prompt being stored is never
evicted for it; a disk or index failure the pool can live with skips the chunk, counted
and warned about (``PrefixPool._skip``), never fails the request. Plain functions of a
``PrefixPool`` (``pool``): its tiers, index, counters and round-robin credits stay on it.
"""

from __future__ import annotations

import os
import time

import torch

from kvdrive.errors import CapacityError
from kvdrive.prefix.keys import bind_sums, chunk_keys
from kvdrive.prefix.store import ChunkWriter, weighted_pick
from kvdrive.storage.host import HostTier

FAILED = object()  # what ``PrefixPool._index`` returns for a call that did not happen


def measure_host_gbps(host: HostTier) -> float:
    """Copy bandwidth out of the host arena (to the GPU when there is one): its stripe weight."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    src = host.rows[: max(1, min(host.num_slots, (256 << 20) // host.row_bytes))]
    dst = torch.empty_like(src, device=dev)
    dst.copy_(src)  # warm-up
    torch.cuda.synchronize() if dev.type == "cuda" else None
    t0 = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize() if dev.type == "cuda" else None
    return src.numel() / max(time.perf_counter() - t0, 1e-9) / 1e9


def restore(pool) -> None:
    """Hand each disk the slots and checksums its index rows name; drop rows that do not fit."""
    rows, stale = {}, []
    for ch in pool.index.all():
        dev = pool._paths.get(os.path.abspath(ch.path))
        if dev is None or len(ch.slots) != pool.num_layers:
            stale.append(ch.key)
        else:
            rows.setdefault(dev, []).append(ch)
    for dev, chunks in rows.items():
        d = pool.pool.devices[dev]
        ok = d.restore([s for ch in chunks for s in ch.slots], [c for ch in chunks for c in bind_sums(ch.key, ch.sums)])
        for j, ch in enumerate(chunks):
            good = ok[j * pool.num_layers : (j + 1) * pool.num_layers]
            if not all(good):
                stale.append(ch.key)
                d.free([s for s, g in zip(ch.slots, good) if g])
    pool.index.remove(stale)


def drop(pool, key: bytes) -> None:
    """Forget a chunk everywhere (it failed a read): index row first, then its slots."""
    slots = pool._host.pop(key, None)
    if slots is not None:
        pool.host.free(slots)
    if pool.index is not None:
        for ch in pool._index("get", [key], default={}).values():
            if pool._index("remove", [key]) is not FAILED:
                pool.pool.devices[pool._paths[os.path.abspath(ch.path)]].free(ch.slots)


def store_chunks(pool, cache, seq_id: int, prompt_ids, tenant: str | None = None) -> int:
    """``PrefixPool.store``: admit, place and write the new full chunks; returns chunks written."""
    c = pool.config.chunk_tokens
    keys = chunk_keys(prompt_ids, pool.namespace(tenant), cache.length(seq_id) // c)
    if not keys:
        return 0
    remote, job = [], None
    if pool.remote is not None:  # written behind, whatever the local tiers keep
        admitted = pool.remote.admit(keys)
        job = pool.remote.begin_write([keys[i] for i in admitted])
        remote = admitted[: len(job.keys)] if job is not None else []
    protect = set(keys)
    on_disk = pool._index("get", keys, default={})
    new = [i for i, k in enumerate(keys) if k not in on_disk]
    counts = pool._index("seen", [keys[i] for i in new], default=[0] * len(new)) if new else []
    host_slots: dict[int, list[int]] = {}
    disk: dict[int, tuple[int, list[int]]] = {}
    for i, count in zip(new, counts):
        admitted = pool.pool is not None and count >= pool.config.admit_after
        placed = alloc_disk(pool, protect) if admitted else None
        if placed is not None:
            disk[i] = placed
        # The host keeps a bandwidth-proportional share of the disk chunks, and what the disks did not take.
        host_share = (
            placed is None or weighted_pick(pool._host_credit, [pool.host_weight, sum(pool.pool.weights)], [0, 1]) == 0
        )
        if pool.host is not None and keys[i] not in pool._host and host_share and host_room(pool, protect):
            host_slots[i] = pool.host.alloc(pool.num_layers)
    if not disk and not host_slots and not remote:
        return 0
    try:
        ok = pool._writer.write(cache, seq_id, pool.pool, pool.host, host_slots, disk, remote, job)
    except BaseException:
        if job is not None:
            pool.remote.cancel(job)
        raise
    if job is not None:
        pool.remote.submit(job)
    for i, slots in host_slots.items():
        pool._host[keys[i]] = slots
    rows = commit_disk(pool, keys, disk, ok)
    pool._counters["disk_in"] += len(rows)
    pool._counters["host_in"] += len(host_slots)
    return len(rows) + len(host_slots)


def commit_disk(pool, keys: list[bytes], disk: dict[int, tuple[int, list[int]]], ok: dict[int, bool]) -> list:
    """Name the chunks written whole in the index, after ``fdatasync`` (data first, index
    second); a chunk whose write, sync or row failed gives its slots back and is skipped."""
    rows, kept = [], []
    for i, (d, slots) in disk.items():
        dev = pool.pool.devices[d]
        if ok[i]:
            rows.append(ChunkWriter.row(keys[i], dev, slots, os.path.abspath(dev.path)))
            kept.append((d, slots))
        else:
            dev.free(slots)
            pool._skip(f"write:{d}", 1, f"writing a chunk to {dev.path} failed ({dev.last_write_error})")
    if not rows:
        return []
    try:
        for d in {d for d, _ in kept}:
            pool.pool.devices[d].sync()
    except OSError as err:
        failed = f"fdatasync failed ({err.strerror or err})"
    else:
        failed = "the index row" if pool._index("insert", rows) is FAILED else None
    if failed is None:
        return rows
    for d, slots in kept:
        pool.pool.devices[d].free(slots)
    pool._skip(f"commit:{failed}", len(rows), f"storing chunks failed: {failed}")
    return []


def alloc_disk(pool, protect: set) -> tuple[int, list[int]] | None:
    """Slots on a disk for one new chunk, or None. A disk whose file system refuses to grow
    (full, file-size limit) is skipped, counted and warned about; the next one is tried."""
    for _ in range(len(pool.pool.devices) + 1):
        dev = place_disk(pool, protect)
        if dev is None:
            return None
        d = pool.pool.devices[dev]
        try:
            slots = d.alloc(pool.num_layers)
        except CapacityError:
            slots = None
        if d.full_reason:
            pool._skip(
                f"full:{dev}",
                0,
                f"{d.path} cannot grow ({d.full_reason}): the pool keeps to the "
                "space it has there, evicting its least recently used chunks",
            )
        if slots is not None:
            return dev, slots
    return None


def place_disk(pool, protect: set) -> int | None:
    """A disk for one new chunk by weighted round-robin, evicting LRU chunks there if full."""
    live = list(range(len(pool.pool.devices)))
    while live:
        dev = weighted_pick(pool._disk_credit, pool.pool.weights, live)
        if disk_room(pool, dev, protect):
            return dev
        live.remove(dev)
    return None


def disk_room(pool, dev: int, protect: set) -> bool:
    d, need = pool.pool.devices[dev], pool.num_layers
    if d.num_slots < need:
        return False
    while d.num_free < need:
        lru = pool._index("lru", os.path.abspath(d.path), len(protect) + 1, default=[])
        victims = [ch for ch in lru if ch.key not in protect]
        if not victims:
            return False
        # the row goes first: a crash never leaves it naming freed slots
        if pool._index("remove", [victims[0].key]) is FAILED:
            return False
        d.free(victims[0].slots)
        pool._counters["evicted_disk"] += 1
    return True


def host_room(pool, protect: set) -> bool:
    while pool.host.num_free < pool.num_layers:
        victim = next((k for k in pool._host if k not in protect), None)
        if victim is None:
            return False
        pool.host.free(pool._host.pop(victim))
        pool._counters["evicted_host"] += 1
    return True
