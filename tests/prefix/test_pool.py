"""Prefix pool: keys, round trips, admission, restart, corruption, cap, tenants, host tier."""

import os
import subprocess
import sys

import pytest
import torch
from factories import PREFIX_C as C
from factories import PREFIX_CFG as CFG
from factories import PREFIX_CHUNK_BYTES as CHUNK_BYTES
from factories import filled_cache, same_kv

from kvdrive.errors import KvdriveError
from kvdrive.prefix.keys import PrefixNamespace, chunk_keys
from kvdrive.prefix.pool import PrefixConfig, PrefixPool
from kvdrive.storage.pool import PoolPath

NS = PrefixNamespace("m", "float32", "kv2-h2-g4-d8-float32", 3, C)


def pool_at(path, budget=1 << 20, **kw) -> PrefixPool:
    kw.setdefault("admit_after", 1)
    disks = (PoolPath(str(path), budget),) if path is not None else ()
    return PrefixPool(
        CFG, torch.float32, PrefixConfig(model="m", disks=disks, chunk_tokens=C, extent_bytes=CHUNK_BYTES, **kw)
    )


def test_keys_are_chained_and_stable_across_processes():
    ids = list(range(100, 118))
    keys = chunk_keys(ids, NS)
    assert len(keys) == 4  # 18 tokens: 4 full chunks, the tail has no key
    assert chunk_keys(ids[:9], NS) == keys[:2]
    changed = chunk_keys(ids[:9] + [7] + ids[10:], NS)  # a token of chunk 2 differs
    assert changed[:2] == keys[:2] and all(x != y for x, y in zip(changed[2:], keys[2:]))
    assert chunk_keys(ids, PrefixNamespace("m", "float32", NS.layout, 3, C, tenant="t"))[0] != keys[0]
    assert chunk_keys(ids, PrefixNamespace("m", "bfloat16", NS.layout, 3, C))[0] != keys[0]
    code = (
        "from kvdrive.prefix.keys import *; ns = PrefixNamespace('m','float32','kv2-h2-g4-d8-float32',3,4); "
        "print(chunk_keys(list(range(100, 118)), ns)[-1].hex())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": os.getcwd()},
    )
    assert other.stdout.strip() == keys[-1].hex()


def test_round_trip_is_bit_exact_and_keeps_the_last_token(tmp_path):
    pool = pool_at(tmp_path)
    try:
        cache, ids = filled_cache(16), list(range(16))
        assert pool.store(cache, 0, ids) == 4
        assert pool.lookup(ids).chunks == 4
        cache.add(1, 64)
        assert pool.load(None, cache, 1, ids) == 12  # 16 tokens: the last chunk holds the last token
        assert cache.length(1) == 12 and same_kv(cache, 0, 1, 12)
        assert pool.last_load.chunks_from_disk == 3 and pool.last_load.bytes_read == 3 * 3 * 512
        assert pool.store(cache, 0, ids) == 0  # already stored
    finally:
        pool.close(remove=True)
    assert os.listdir(tmp_path) == []


def test_admission_needs_two_sightings_by_default(tmp_path):
    pool = pool_at(tmp_path, admit_after=2)
    try:
        cache, ids = filled_cache(9), list(range(9))
        assert pool.store(cache, 0, ids) == 0 and pool.lookup(ids).chunks == 0
        assert pool.store(cache, 0, ids) == 2 and pool.lookup(ids).chunks == 2
    finally:
        pool.close(remove=True)


def test_restart_recovers_the_index_and_reuses_the_extents(tmp_path):
    cache, ids = filled_cache(13), list(range(13))
    pool = pool_at(tmp_path)
    pool.store(cache, 0, ids)
    used = pool.stats().disk_bytes_used
    pool.close()
    pool = pool_at(tmp_path)
    try:
        s = pool.stats()
        assert s.index_chunks == 3 and s.disk_bytes_used == used
        cache.add(1, 64)
        assert pool.load(None, cache, 1, ids) == 12 and same_kv(cache, 0, 1, 12)
        pool.store(filled_cache(8, seed=1), 0, list(range(50, 58)))  # new chunks take free slots, not live ones
        cache.add(2, 64)
        assert pool.load(None, cache, 2, ids) == 12 and same_kv(cache, 0, 2, 12)
    finally:
        pool.close(remove=True)


def test_restart_with_another_geometry_is_refused(tmp_path):
    pool_at(tmp_path).close()
    with pytest.raises(KvdriveError, match="geometry"):
        PrefixPool(
            CFG,
            torch.float16,
            PrefixConfig(
                model="m", disks=(PoolPath(str(tmp_path), 1 << 20),), chunk_tokens=C, extent_bytes=CHUNK_BYTES
            ),
        )


def corrupt(pool, key, layer):
    ch = pool.index.get([key])[key]
    path, off = pool.pool.devices[0].locate(ch.slots[layer])
    with open(path, "r+b") as f:
        f.seek(off + 100)
        f.write(b"\xff" * 8)
        f.flush()
        os.fsync(f.fileno())


def test_corrupt_chunk_is_dropped_and_recomputed_never_served(tmp_path):
    pool = pool_at(tmp_path)
    try:
        cache, ids = filled_cache(17), list(range(17))
        pool.store(cache, 0, ids)
        keys = chunk_keys(ids, pool.namespace())
        corrupt(pool, keys[2], layer=2)  # the last layer: detected after layers 0-1 were imported
        cache.add(1, 64)
        assert pool.load(None, cache, 1, ids) == 8  # chunks 0-1 only
        assert cache.length(1) == 8 and same_kv(cache, 0, 1, 8)
        assert pool.stats().corrupt_chunks == 1 and pool.lookup(ids).chunks == 2
        pool.store(cache, 0, ids)  # the recomputed chunk is stored again
        assert pool.lookup(ids).chunks == 4
    finally:
        pool.close(remove=True)


def test_disk_cap_is_physical_and_lru_evicts(tmp_path):
    pool = pool_at(tmp_path, budget=5 * CHUNK_BYTES)  # room for 5 chunks
    try:
        a, b = list(range(12)), list(range(100, 112))
        pool.store(filled_cache(12), 0, a)
        pool.lookup(a)
        pool.store(filled_cache(12, seed=1), 0, b)  # 3 more chunks: a's oldest go
        s = pool.stats()
        assert s.evicted_disk >= 1 and s.disk_physical_bytes <= 5 * CHUNK_BYTES
        assert pool.lookup(b).chunks == 3 and pool.lookup(a).chunks < 3
        pool.store(filled_cache(40, seed=2), 0, list(range(200, 240)))  # 10 chunks > cap: what fits
        assert pool.stats().disk_physical_bytes <= 5 * CHUNK_BYTES
        assert 0 < pool.lookup(list(range(200, 240))).chunks <= 5
    finally:
        pool.close(remove=True)


def test_tenants_never_hit_each_other(tmp_path):
    pool = pool_at(tmp_path)
    try:
        cache, ids = filled_cache(9), list(range(9))
        pool.store(cache, 0, ids, tenant="alice")
        assert pool.lookup(ids, tenant="alice").chunks == 2
        assert pool.lookup(ids, tenant="bob").chunks == 0 and pool.lookup(ids).chunks == 0
        cache.add(1, 64)
        assert pool.load(None, cache, 1, ids) == 0 and cache.length(1) == 0
    finally:
        pool.close(remove=True)


def test_host_only_pool(tmp_path):
    pool = pool_at(None, host_bytes=4 * CHUNK_BYTES)
    try:
        cache, ids = filled_cache(21), list(range(21))
        assert pool.store(cache, 0, ids) == 4  # 5 chunks, host room for 4
        cache.add(1, 64)
        assert pool.load(None, cache, 1, ids) == 16 and same_kv(cache, 0, 1, 16)
        assert pool.last_load.chunks_from_host == 4
    finally:
        pool.close()


def test_host_and_disk_share_chunks_by_weight_and_load_together(tmp_path):
    pool = pool_at(tmp_path, host_bytes=8 * CHUNK_BYTES, host_weight=1.0)
    try:
        cache, ids = filled_cache(33), list(range(33))
        pool.store(cache, 0, ids)
        s = pool.stats()
        assert s.index_chunks == 8 and s.host_chunks == 4  # every chunk on disk, half also in host
        cache.add(1, 64)
        assert pool.load(None, cache, 1, ids) == 32 and same_kv(cache, 0, 1, 32)
        assert pool.last_load.chunks_from_host == 4 and pool.last_load.chunks_from_disk == 4
    finally:
        pool.close(remove=True)


def test_two_disk_paths_stripe_by_weight(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    pool = PrefixPool(
        CFG,
        torch.float32,
        PrefixConfig(
            model="m",
            disks=(PoolPath(str(a), 1 << 20, weight=3.0), PoolPath(str(b), 1 << 20, weight=1.0)),
            chunk_tokens=C,
            admit_after=1,
            extent_bytes=CHUNK_BYTES,
        ),
    )
    try:
        cache, ids = filled_cache(33), list(range(33))
        pool.store(cache, 0, ids)
        devs = [s.device for s in pool.lookup(ids).sources]
        assert devs.count(0) == 6 and devs.count(1) == 2
        cache.add(1, 64)
        assert pool.load(None, cache, 1, ids) == 32 and same_kv(cache, 0, 1, 32)
    finally:
        pool.close(remove=True)
