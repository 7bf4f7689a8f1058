import errno
import os
import resource
import warnings

import pytest
import torch

from kvdrive.errors import CapacityError, KvdriveError
from kvdrive.storage.disk import DiskDevice
from kvdrive.storage.host import HostTier
from kvdrive.storage.io_engine import InjectedFaults
from kvdrive.storage.layout import GroupLayout
from kvdrive.storage.probe import DirectIOWarning, probe_direct

LAYOUT = GroupLayout(2, 2, 16, torch.float16, 4)  # 512 B group in a 4 KiB slot
SB = LAYOUT.slot_bytes


def make(tmp_path, slots=16, extent_slots=4, **kw):
    return DiskDevice(str(tmp_path), LAYOUT, slots * SB, extent_bytes=extent_slots * SB, **kw)


def extents(path) -> list[str]:
    return [f for f in os.listdir(path) if f.endswith(".extent")]


def filled_host(n, seed=0):
    host = HostTier(LAYOUT, n * SB, pin=False)
    g = torch.Generator().manual_seed(seed)
    host.rows.copy_(torch.randint(0, 256, host.rows.shape, generator=g, dtype=torch.uint8))
    return host


def write_read(disk, host, slots):
    assert disk.write(slots, [host.buffer(i) for i in range(len(slots))]).result() == [None] * len(slots)
    back = HostTier(LAYOUT, len(slots) * SB, pin=False)
    res = disk.read(slots, [back.buffer(i) for i in range(len(slots))]).result()
    return back, res


def test_round_trip_bit_exact_across_extents(tmp_path):
    disk = make(tmp_path)
    try:
        host = filled_host(10)
        slots = disk.alloc(10)  # spans 3 extents of 4 slots
        back, res = write_read(disk, host, slots)
        assert res == [None] * 10
        gb = LAYOUT.group_bytes
        assert torch.equal(back.rows[:, :gb], host.rows[:, :gb])
        assert len(extents(tmp_path)) == 3  # extent files, not a file per group
    finally:
        disk.close()
    assert os.listdir(tmp_path) == []


def test_budget_is_physical_and_extents_grow_lazily(tmp_path):
    disk = make(tmp_path, slots=10, extent_slots=4)
    try:
        assert disk.physical_bytes() == 0
        disk.alloc(5)
        assert disk.physical_bytes() == 8 * SB  # two extents, fully allocated by fallocate
        disk.alloc(5)
        assert disk.physical_bytes() == 10 * SB  # the last extent is cut to the budget
        assert all(
            os.stat(os.path.join(tmp_path, f)).st_blocks * 512 >= os.stat(os.path.join(tmp_path, f)).st_size
            for f in os.listdir(tmp_path)
        )
        with pytest.raises(CapacityError):
            disk.alloc(1)
    finally:
        disk.close()


def test_flipped_byte_is_a_checksum_miss(tmp_path):
    disk = make(tmp_path)
    try:
        host = filled_host(3)
        slots = disk.alloc(3)
        write_read(disk, host, slots)
        path = disk._paths[0]
        with open(path, "r+b") as f:  # flip one byte of the second group, through the page cache
            f.seek(slots[1] * SB + 100)
            b = f.read(1)
            f.seek(slots[1] * SB + 100)
            f.write(bytes([b[0] ^ 0xFF]))
        back = HostTier(LAYOUT, 3 * SB, pin=False)
        res = disk.read(slots, [back.buffer(i) for i in range(3)]).result()
        assert res == [None, "checksum", None]
    finally:
        disk.close()


def test_injected_read_errors_and_short_reads(tmp_path):
    faults = InjectedFaults()
    disk = make(tmp_path, faults=faults, extent_slots=16)
    try:
        host = filled_host(4)
        slots = disk.alloc(4)
        disk.write(slots, [host.buffer(i) for i in range(4)]).result()
        faults.fail("read", errno.EIO, offset=slots[0] * SB, times=2)  # the read and its retry
        back = HostTier(LAYOUT, 4 * SB, pin=False)
        # one run per slot so that one fault hits one group only
        res = [disk.read([s], [back.buffer(i)]).result()[0] for i, s in enumerate(slots)]
        assert res == ["io_error", None, None, None]
        faults.short("read", offset=slots[2] * SB, times=2)
        assert disk.read([slots[2]], [back.buffer(2)]).result() == ["short_read"]
        faults.short("read", offset=slots[2] * SB)  # transient: the retry reads it
        assert disk.read([slots[2]], [back.buffer(2)]).result() == [None]
        assert disk.read_failures == 2
    finally:
        disk.close()


def test_write_error_is_reported_not_raised(tmp_path):
    faults = InjectedFaults().fail("write", errno.ENOSPC, times=2)  # the write and its retry
    disk = make(tmp_path, faults=faults)
    try:
        host = filled_host(2)
        slots = disk.alloc(2)
        assert disk.write(slots, [host.buffer(0), host.buffer(1)]).result() == ["io_error", "io_error"]
        assert disk.metrics.snapshot().write_errors == 2
        back = HostTier(LAYOUT, 2 * SB, pin=False)
        assert disk.read(slots, [back.buffer(0), back.buffer(1)]).result() == ["absent", "absent"]
    finally:
        disk.close()


def test_full_file_system_is_a_capacity_error(tmp_path):
    faults = InjectedFaults().fail("fallocate", errno.ENOSPC, times=2)  # the extent, then what fits of it
    disk = make(tmp_path, faults=faults)
    try:
        with pytest.raises(CapacityError, match="No space|ENOSPC"):
            disk.alloc(1)
        assert extents(tmp_path) == []  # the failed extent was removed
    finally:
        disk.close()


def test_rlimit_fsize_is_a_capacity_error(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    disk = make(tmp_path, slots=16, extent_slots=8)
    try:
        disk.alloc(8)  # first extent fits
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 * SB, hard))
        disk.alloc(3)  # the second extent takes what the limit leaves (less a slot of margin) and is the last
        with pytest.raises(CapacityError, match="too large|File too large"):
            disk.alloc(1)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        disk.close()


def test_odirect_refusal_is_loud(tmp_path):
    faults = InjectedFaults().fail("open_direct", errno.EINVAL)
    with pytest.warns(DirectIOWarning, match="O_DIRECT refused"):
        disk = make(tmp_path, faults=faults)
    try:
        assert disk.direct is False
        host = filled_host(2)
        back, res = write_read(disk, host, disk.alloc(2))  # buffered path still bit-exact
        assert res == [None, None]
        assert torch.equal(back.rows, host.rows)
    finally:
        disk.close()
    with pytest.raises(KvdriveError, match="O_DIRECT refused"):
        make(tmp_path, faults=InjectedFaults().fail("open_direct", errno.EINVAL), direct="on")


def test_direct_probe_on_tmp_and_shm(tmp_path):
    assert probe_direct(str(tmp_path)).ok  # ext4/xfs take O_DIRECT
    if os.path.isdir("/dev/shm"):
        # tmpfs took no O_DIRECT before Linux 6.6; whichever it is, the probe says so and
        # the device agrees with it (warning when refused, never silently buffered).
        shm = probe_direct("/dev/shm")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            disk = DiskDevice("/dev/shm", LAYOUT, 4 * SB)
        disk.close()
        assert disk.direct == shm.ok
        assert any(issubclass(w.category, DirectIOWarning) for w in caught) == (not shm.ok)
        assert shm.ok or "errno" in shm.reason


def test_restore_rejects_duplicate_and_out_of_range_slots(tmp_path):
    layout = GroupLayout(1, 1, 8, torch.float32, 4)
    d = DiskDevice(str(tmp_path), layout, 8 * layout.slot_bytes, extent_bytes=8 * layout.slot_bytes, persist_name="t")
    d.alloc(1)  # one extent of 8 slots
    d.close()
    d = DiskDevice(str(tmp_path), layout, 8 * layout.slot_bytes, extent_bytes=8 * layout.slot_bytes, persist_name="t")
    try:
        assert d.restore([0, 1, 1, 8, -1, 2], [10, 11, 12, 13, 14, 15]) == [True, True, False, False, False, True]
        assert d.checksums([0, 1, 2]) == [10, 11, 15]  # the first claim of slot 1 kept its checksum
        assert sorted(d.alloc(5)) == [3, 4, 5, 6, 7]  # the restored slots are not handed out again
    finally:
        d.close(remove=True)
