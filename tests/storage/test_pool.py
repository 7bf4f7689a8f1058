import json
from pathlib import Path

import pytest
import torch

from kvdrive.errors import CapacityError
from kvdrive.storage import probe
from kvdrive.storage.host import HostTier
from kvdrive.storage.layout import GroupLayout
from kvdrive.storage.pool import DiskPool, PoolPath

LAYOUT = GroupLayout(2, 2, 16, torch.float16, 4)
SB = LAYOUT.slot_bytes


def three_paths(tmp_path, slots=(40, 40, 40), weights=(1.0, 2.0, 3.0)):
    paths = []
    for i, (n, w) in enumerate(zip(slots, weights)):
        d = tmp_path / f"dev{i}"
        d.mkdir()
        paths.append(PoolPath(str(d), n * SB, w))
    return paths


def test_striping_follows_weights_and_interleaves(tmp_path):
    pool = DiskPool.open(three_paths(tmp_path), LAYOUT)
    try:
        addrs = pool.alloc(60)
        counts = [sum(a.device == d for a in addrs) for d in range(3)]
        assert counts == [10, 20, 30]
        # smooth round-robin: every window of 6 consecutive groups hits every device
        for start in range(0, 60, 6):
            assert {a.device for a in addrs[start : start + 6]} == {0, 1, 2}
        # small allocations keep the proportion over time (the credit persists)
        more = [pool.alloc(1)[0].device for _ in range(12)]
        assert [more.count(d) for d in range(3)] == [2, 4, 6]
    finally:
        pool.close()


def test_full_device_drops_out_then_capacity_error(tmp_path):
    pool = DiskPool.open(three_paths(tmp_path, slots=(2, 4, 100), weights=(5.0, 5.0, 1.0)), LAYOUT)
    try:
        addrs = pool.alloc(30)
        counts = [sum(a.device == d for a in addrs) for d in range(3)]
        assert counts == [2, 4, 24]
        free_before = pool.num_free
        with pytest.raises(CapacityError, match="disk pool"):
            pool.alloc(free_before + 1)
        assert pool.num_free == free_before  # nothing taken by the failed call
    finally:
        pool.close()


def test_round_trip_over_three_paths(tmp_path):
    pool = DiskPool.open(three_paths(tmp_path), LAYOUT)
    try:
        n = 24
        host = HostTier(LAYOUT, 2 * n * SB, pin=False)
        host.rows[:n].copy_(torch.randint(0, 256, (n, SB), dtype=torch.uint8))
        addrs = pool.alloc(n)
        assert pool.write(addrs, [host.buffer(i) for i in range(n)]).result() == [None] * n
        res = pool.read(addrs, [host.buffer(n + i) for i in range(n)]).result()
        assert res == [None] * n
        gb = LAYOUT.group_bytes
        assert torch.equal(host.rows[n:, :gb], host.rows[:n, :gb])
        pool.free(addrs)
        assert pool.num_free == pool.num_slots
    finally:
        pool.close()


def test_weights_come_from_the_probe_file(tmp_path):
    paths = three_paths(tmp_path, weights=(None, None, None))
    for p, gbps in zip(paths, (1.0, 1.0, 2.0)):
        probe.save(probe.DeviceProbe(p.path, SB, True, gbps, 1.0, 8, 1 << 20, "2026-01-01T00:00:00"))
    assert json.loads(Path(paths[2].path, probe.PROBE_FILE).read_text())[str(SB)]["read_gbps"] == 2.0
    pool = DiskPool.open(paths, LAYOUT)
    try:
        assert pool.weights == [1.0, 1.0, 2.0]
        addrs = pool.alloc(40)
        assert [sum(a.device == d for a in addrs) for d in range(3)] == [10, 10, 20]
    finally:
        pool.close()
