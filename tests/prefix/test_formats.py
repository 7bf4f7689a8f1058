"""Prefix pool in compressed storage formats: round trips, bytes, and formats never mixed."""

import pytest
import torch
from factories import PREFIX_C as C
from factories import PREFIX_CFG as CFG
from factories import filled_cache

from kvdrive.cache.contiguous import ContiguousKVCache
from kvdrive.errors import KvdriveError
from kvdrive.prefix.keys import bind_sums, chunk_keys
from kvdrive.prefix.pool import PrefixConfig, PrefixPool
from kvdrive.storage.pool import PoolPath

# Relative error of the loaded KV of Gaussian keys and values, per format.
BOUNDS = {"bf16": 0.0, "fp8": 0.04, "int8": 0.012, "int4": 0.15}
# The factories' chunk (2 heads x 4 tokens x 8 dims, fp32) in 1 MiB of disk at most.
BUDGET = 1 << 20


def pool_at(path, kv_dtype, host_bytes=0):
    disks = (PoolPath(str(path), BUDGET),) if path is not None else ()
    return PrefixPool(
        CFG,
        torch.float32,
        PrefixConfig(model="m", disks=disks, chunk_tokens=C, admit_after=1, host_bytes=host_bytes, kv_dtype=kv_dtype),
    )


def rel_err(a, sa, b, sb, n):
    """Relative error of sequence ``sb`` of cache ``b`` against sequence ``sa`` of cache ``a``."""
    num = den = 0.0
    for layer in range(CFG.num_hidden_layers):
        for x, y in zip(a.export_kv(sa, layer, 0, n), b.export_kv(sb, layer, 0, n)):
            num += float((x - y).norm() ** 2)
            den += float(x.norm() ** 2)
    return (num / den) ** 0.5


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
@pytest.mark.parametrize("tier", ["disk", "host"])
def test_compressed_round_trip_is_close_and_reads_fewer_bytes(tmp_path, fmt, tier):
    pool = pool_at(tmp_path if tier == "disk" else None, fmt, host_bytes=0 if tier == "disk" else BUDGET)
    try:
        cache, ids = filled_cache(17), list(range(17))
        assert pool.store(cache, 0, ids) == 4
        cache.add(1, 64)
        assert pool.load(None, cache, 1, ids) == 16 and cache.length(1) == 16
        err = rel_err(cache, 0, cache, 1, 16)
        assert 0 < err <= BOUNDS[fmt], err  # quantized, so not bit-exact; within the format's bound
        plain = 4 * CFG.num_hidden_layers * 2 * 2 * C * 8 * 4  # the same chunks in fp32
        assert pool.last_load.bytes_read == 4 * CFG.num_hidden_layers * pool.layout.stored_bytes < plain
    finally:
        pool.close(remove=tier == "disk")


def test_a_pool_written_in_one_format_is_never_read_as_another(tmp_path):
    cache, ids = filled_cache(12), list(range(12))
    pool = pool_at(tmp_path, "fp8")
    keys_fp8 = chunk_keys(ids, pool.namespace())
    pool.store(cache, 0, ids)
    row = pool.index.get(keys_fp8[:1])[keys_fp8[0]]
    pool.close()
    for other in ("bf16", "int8", "int4"):  # the directory is refused (int8: fp8's very bytes), extents untouched
        with pytest.raises(KvdriveError, match="kv_dtype"):
            pool_at(tmp_path, other)
    # keys and bound checksums carry the format: another format's key never verifies these slots
    host = pool_at(None, "bf16", host_bytes=BUDGET)
    keys_bf16 = chunk_keys(ids, host.namespace())
    assert not set(keys_bf16) & set(keys_fp8)
    raw = bind_sums(keys_fp8[0], row.sums)
    assert bind_sums(keys_bf16[0], raw) != row.sums
    host.close()
    again = pool_at(tmp_path, "fp8")  # the same format finds its chunks after a restart
    try:
        assert again.lookup(ids).chunks == 3
        fresh = ContiguousKVCache(CFG, 2, 64, torch.device("cpu"), torch.float32)
        fresh.add(0, 64)
        assert again.load(None, fresh, 0, ids) == 8
        err = rel_err(cache, 0, fresh, 0, 8)
        assert 0 < err <= BOUNDS["fp8"]
    finally:
        again.close(remove=True)


def test_bad_kv_dtype_is_refused_by_name():
    with pytest.raises(KvdriveError, match="bf16, fp8, int8, int4"):
        PrefixConfig(model="m", host_bytes=1 << 20, kv_dtype="fp16")


def test_smaller_slots_keep_as_many_bytes_in_flight(tmp_path):
    """A pool's read depth follows its slot size: the 8B shape's bf16 chunk (1 MiB) reads 32 at
    a time, its fp8 (520 KiB) and int4 (268 KiB) chunks 64 and 123, so each format keeps the
    same 32 MiB in flight; an explicit depth wins."""
    from kvdrive.storage.disk import read_depth_for

    assert [read_depth_for(b) for b in (1 << 20, 520 << 10, 268 << 10, 4096)] == [32, 64, 123, 128]
    (tmp_path / "b").mkdir()
    pool = pool_at(tmp_path, "bf16")
    assert pool.pool.devices[0]._reads.depth == read_depth_for(pool.layout.slot_bytes) == 128
    pool.close()
    pinned = PrefixPool(
        CFG,
        torch.float32,
        PrefixConfig(model="m", disks=(PoolPath(str(tmp_path / "b"), BUDGET),), chunk_tokens=C, read_depth=8),
    )
    assert pinned.pool.devices[0]._reads.depth == 8
    pinned.close()
    with pytest.raises(KvdriveError, match="read_depth"):
        PrefixConfig(model="m", host_bytes=1 << 20, read_depth=0)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
def test_compressed_pool_loads_on_the_gpu_like_the_torch_twin(tmp_path, fmt):
    """Store and load on CUDA (quantize on the device, host chunks copied through UVA, the Triton
    dequantizer per layer); the loaded KV equals the torch round trip of what was stored."""
    from kvdrive.quant import dequantize, quantize

    dev, dt = torch.device("cuda"), torch.bfloat16
    cache = ContiguousKVCache(CFG, 2, 64, dev, dt)
    cache.add(0, 64)
    g = torch.Generator(device="cuda").manual_seed(0)
    b = cache.plan([0], 17)
    for layer in range(CFG.num_hidden_layers):
        k, v = (torch.randn(1, 2, 17, 8, generator=g, device=dev, dtype=dt) for _ in range(2))
        cache.append(layer, k, v, b)
    cache.commit(b)
    pool = PrefixPool(
        CFG,
        dt,
        PrefixConfig(
            model="m",
            disks=(PoolPath(str(tmp_path), BUDGET),),
            host_bytes=2 * CFG.num_hidden_layers * 4096,
            host_weight=1.0,
            chunk_tokens=C,
            admit_after=1,
            kv_dtype=fmt,
        ),
    )
    try:
        ids = list(range(17))
        # store counts a chunk once per tier: all four on disk, two also in the host's share (room for two)
        assert pool.store(cache, 0, ids) == 6
        cache.add(1, 64)
        assert pool.load(None, cache, 1, ids) == 16
        rep = pool.last_load
        assert rep.chunks_from_host > 0 and rep.chunks_from_disk > 0
        for layer in range(CFG.num_hidden_layers):
            k, v = cache.export_kv(0, layer, 0, 16)  # (H, 16, D)
            kv = torch.stack([k.view(2, 4, C, 8), v.view(2, 4, C, 8)]).permute(2, 0, 1, 3, 4)  # (4, 2, H, C, D)
            want = dequantize(quantize(kv.contiguous(), fmt), fmt, (2, C, 8), dt)
            gk, gv = cache.export_kv(1, layer, 0, 16)
            got = torch.stack([gk.view(2, 4, C, 8), gv.view(2, 4, C, 8)]).permute(2, 0, 1, 3, 4)
            torch.testing.assert_close(got, want)
    finally:
        pool.close(remove=True)
