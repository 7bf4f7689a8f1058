import errno
import os

import pytest
import torch

from kvdrive.errors import CapacityError, KvdriveError
from kvdrive.kv.io_engine import InjectedFaults
from kvdrive.kv.layout import GroupKey, GroupLayout
from kvdrive.kv.pool import PoolPath
from kvdrive.kv.store import KVStore, StoreConfig

LAYOUT = GroupLayout(4, 2, 16, torch.bfloat16, 4)  # 512 B group, 4 KiB slot
SB, GB = LAYOUT.slot_bytes, LAYOUT.group_bytes


def groups(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *LAYOUT.slot_shape, generator=g).to(LAYOUT.dtype)  # (n, 2, H_kv, G, D)


def keys(seq, n, layer=0):
    return [GroupKey(seq, layer, i) for i in range(n)]


def make_store(tmp_path, host_slots=8, disk_slots=64, gpu_slots=8, paths=1, faults=None, **kw):
    disk = []
    for i in range(paths):
        d = tmp_path / f"d{i}"
        d.mkdir(exist_ok=True)
        disk.append(PoolPath(str(d), disk_slots * SB))
    cfg = StoreConfig(host_bytes=host_slots * SB, disk=tuple(disk), gpu_bytes=gpu_slots * GB,
                      extent_bytes=16 * SB, **kw)
    return KVStore(LAYOUT, cfg, device="cpu", faults=faults)


def fetch(store, ks):
    out = torch.zeros(len(ks), *LAYOUT.slot_shape, dtype=LAYOUT.dtype)
    res = store.fetch(ks, out).wait()
    res.event.wait()
    return out, res


def test_round_trip_through_every_tier_bit_exact(tmp_path):
    with make_store(tmp_path, host_slots=16, gpu_slots=8) as store:
        data, ks = groups(6), keys(1, 6)
        store.put(ks, data)
        out, res = fetch(store, ks)  # host hits (write-behind may still run)
        assert torch.equal(out, data) and res.misses == () and res.from_host == 6
        store.flush()
        assert all(store.where(k) == ("host", "disk") for k in ks)
        assert store.demote(ks, "disk") == 6
        assert all(store.where(k) == ("disk",) for k in ks)
        out, res = fetch(store, ks[::-1])  # disk -> host -> destination
        assert torch.equal(out, data.flip(0)) and res.from_disk == 6
        res = store.promote(ks[:3], "gpu")
        assert res.misses == () and store.where(ks[0]) == ("gpu", "host", "disk")
        out, res = fetch(store, ks)
        assert torch.equal(out, data) and (res.from_gpu, res.from_host) == (3, 3)
        assert store.demote(ks[:3], "host") == 3 and store.where(ks[0]) == ("host", "disk")
        m = store.metrics()
        assert m.hits == {"gpu": 3, "host": 9, "disk": 6}
        assert m.moved["host->disk"].groups == 6 and m.moved["disk->host"].bytes == 6 * GB
        assert m.latency["disk_read"].count >= 1


def test_host_eviction_is_lru_and_never_loses_data(tmp_path):
    with make_store(tmp_path, host_slots=4) as store:
        data = groups(8)
        store.put(keys(1, 4), data[:4])
        store.flush()
        fetch(store, [GroupKey(1, 0, 0)])  # touch group 0: group 1 is now least recently used
        store.put(keys(2, 2), data[4:6])  # two host slots needed: evict groups 1 and 2
        assert store.where(GroupKey(1, 0, 1)) == ("disk",)
        assert store.where(GroupKey(1, 0, 2)) == ("disk",)
        assert "host" in store.where(GroupKey(1, 0, 0)) and "host" in store.where(GroupKey(1, 0, 3))
        out, res = fetch(store, keys(1, 4) + keys(2, 2))
        assert res.misses == () and torch.equal(out, data[:6])


def test_gpu_cache_eviction_order_and_write_back(tmp_path):
    with make_store(tmp_path, host_slots=8, gpu_slots=4, gpu_cache_fraction=0.5) as store:
        data = groups(4)
        ks = keys(1, 4)
        store.put(ks, data)
        store.promote(ks[:2], "gpu")
        fetch(store, ks[:1])  # touch 0
        store.promote(ks[2:3], "gpu")  # cache holds 2: evicts 1 (LRU)
        assert "gpu" in store.where(ks[0]) and "gpu" not in store.where(ks[1]) and "gpu" in store.where(ks[2])
        out, _ = fetch(store, ks)
        assert torch.equal(out, data)


def test_host_only_store_reports_capacity_error(tmp_path):
    cfg = StoreConfig(host_bytes=4 * SB)
    store = KVStore(LAYOUT, cfg, device="cpu")
    store.put(keys(1, 4), groups(4))
    with pytest.raises(CapacityError, match="host tier full"):
        store.put(keys(2, 1), groups(1))
    out, res = fetch(store, keys(1, 4))
    assert res.misses == () and torch.equal(out, groups(4))  # nothing lost
    assert store.free_sequence(1) == 4 and store.metrics().capacity["host"].used_bytes == 0
    store.put(keys(2, 1), groups(1))


def test_budgets_are_respected_physically(tmp_path):
    with make_store(tmp_path, host_slots=4, disk_slots=20) as store:
        for seq in range(4):
            store.put(keys(seq, 5), groups(5, seed=seq))
        store.flush()
        m = store.metrics()
        assert m.capacity["host"].used_bytes <= 4 * SB
        assert m.capacity["disk"].physical_bytes <= 20 * SB
        files = [f for f in os.listdir(tmp_path / "d0") if f.endswith(".extent")]
        assert sum(os.stat(tmp_path / "d0" / f).st_blocks * 512 for f in files) <= 20 * SB
        with pytest.raises(CapacityError, match="disk pool"):
            store.put(keys(9, 1), groups(1))
        for seq in range(4):  # the failed put lost nothing
            out, res = fetch(store, keys(seq, 5))
            assert res.misses == () and torch.equal(out, groups(5, seed=seq))
        store.free_sequence(0)
        store.put(keys(9, 5), groups(5, seed=9))  # freed disk slots are reused


def test_flipped_byte_on_disk_is_a_miss_and_nothing_else_is_lost(tmp_path):
    with make_store(tmp_path, host_slots=8) as store:
        data, ks = groups(4), keys(1, 4)
        store.put(ks, data)
        store.flush()
        store.demote(ks, "disk")
        addr = store._entries[ks[2]].disk
        dev = store.pool.devices[addr.device]
        path = dev._paths[addr.slot // dev.extent_slots]
        with open(path, "r+b") as f:
            off = (addr.slot % dev.extent_slots) * SB + 7
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0x01]))
        out, res = fetch(store, ks)
        assert res.misses == (2,)
        assert torch.equal(out[[0, 1, 3]], data[[0, 1, 3]])
        assert torch.equal(out[2], torch.zeros_like(out[2]))  # never filled with the bad bytes
        assert store.metrics().misses["checksum"] == 1
        assert store.where(ks[2]) == ()  # the engine recomputes and puts it again
        store.put(ks[2:3], data[2:3])
        out, res = fetch(store, ks)
        assert res.misses == () and torch.equal(out, data)


def test_injected_eio_on_read_is_a_miss(tmp_path):
    faults = InjectedFaults()
    with make_store(tmp_path, host_slots=8, faults=faults) as store:
        data, ks = groups(3), keys(1, 3)
        store.put(ks, data)
        store.flush()
        store.demote(ks, "disk")
        faults.fail("read", errno.EIO, times=-1)
        out, res = fetch(store, ks)
        assert res.misses == (0, 1, 2) and store.metrics().misses["io_error"] == 3
        assert torch.count_nonzero(out.view(torch.int16)) == 0


def test_injected_enospc_on_write_keeps_the_host_copy(tmp_path):
    faults = InjectedFaults().fail("write", errno.ENOSPC, times=-1)
    with make_store(tmp_path, host_slots=4, faults=faults) as store:
        data, ks = groups(3), keys(1, 3)
        store.put(ks, data)
        store.flush()
        assert store.metrics().write_errors == 3
        assert all(store.where(k) == ("host",) for k in ks)
        out, res = fetch(store, ks)
        assert res.misses == () and torch.equal(out, data)
        assert store.demote(ks, "disk") == 0  # no disk copy: stays in host
        with pytest.raises(CapacityError, match="host tier full"):
            store.put(keys(2, 2), groups(2))  # host pinned by undurable groups: a clear error


def test_enospc_when_growing_an_extent_is_a_capacity_error(tmp_path):
    faults = InjectedFaults()
    with make_store(tmp_path, host_slots=8, disk_slots=64, faults=faults) as store:
        store.put(keys(1, 16), groups(16))  # fills the first extent of 16 slots
        faults.fail("fallocate", errno.ENOSPC)
        with pytest.raises(CapacityError, match="ENOSPC|No space"):
            store.put(keys(2, 1), groups(1))
        store.flush()
        out, res = fetch(store, keys(1, 16))
        assert res.misses == () and torch.equal(out, groups(16))


def test_striped_store_over_three_paths(tmp_path):
    with make_store(tmp_path, host_slots=8, paths=3) as store:
        data = groups(30)
        store.put(keys(1, 30), data)
        store.flush()
        store.demote(keys(1, 30), "disk")
        used = [d.bytes_used // SB for d in store.pool.devices]
        assert used == [10, 10, 10]
        out = torch.zeros_like(data)
        for lo in range(0, 30, 8):  # a fetch stages at most host_slots groups
            res = store.fetch(keys(1, 30)[lo : lo + 8], out[lo : lo + 8]).wait()
            assert res.misses == ()
        assert torch.equal(out, data)


def test_misses_for_unknown_keys_and_free_sequence(tmp_path):
    with make_store(tmp_path) as store:
        store.put(keys(1, 2), groups(2))
        out, res = fetch(store, [GroupKey(1, 0, 1), GroupKey(7, 0, 0)])
        assert res.misses == (1,) and store.metrics().misses["absent"] == 1
        slots = store.gpu.reserve(1, 2)
        assert slots.shape == (2,) and store.gpu.num_free == 6
        assert store.free_sequence(1) == 2
        assert store.gpu.num_free == 8
        store.flush()
        assert store.pool.num_free == store.pool.num_slots


def test_config_validation():
    with pytest.raises(KvdriveError):
        StoreConfig(host_bytes=0)
    with pytest.raises(KvdriveError, match="policy"):
        StoreConfig(host_bytes=SB, policy="mru")
    with pytest.raises(KvdriveError, match="twice"):
        StoreConfig(host_bytes=SB, disk=(PoolPath("/tmp", SB), PoolPath("/tmp", SB)))


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["triton", "staging"])
def test_cuda_round_trip_through_every_tier(tmp_path, method):
    from kvdrive.kv.gather import triton_available

    if method == "triton" and not triton_available():
        pytest.skip("triton not installed")
    d = tmp_path / "d0"
    d.mkdir()
    cfg = StoreConfig(host_bytes=8 * SB, disk=(PoolPath(str(d), 64 * SB),), gpu_bytes=8 * GB, copy_method=method)
    with KVStore(LAYOUT, cfg, device="cuda") as store:
        assert store.host.pinned
        data = groups(12).cuda()
        ks = keys(1, 12)
        store.put(ks, data)  # GPU -> host write-back, then disk write-behind; 12 > 8 host slots
        store.flush()
        store.demote(ks, "disk")
        out = torch.zeros_like(data)
        res = store.fetch(ks, out).wait()  # disk -> host -> GPU in two rounds
        res.event.synchronize()
        assert res.misses == () and torch.equal(out, data)
        res = store.promote(ks[:4], "gpu")
        res.event.synchronize()
        out.zero_()
        res = store.fetch(ks[:6], out[:6]).wait()
        res.event.synchronize()
        assert (res.from_gpu, res.misses) == (4, ()) and torch.equal(out[:6], data[:6])
        cpu_out = torch.zeros(6, *LAYOUT.slot_shape, dtype=LAYOUT.dtype)  # pageable CPU destination
        res = store.fetch(ks[:6], cpu_out).wait()
        res.event.synchronize()
        assert torch.equal(cpu_out, data[:6].cpu())
