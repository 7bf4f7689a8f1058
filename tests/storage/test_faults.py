"""The seeded fault layer: each kind does what it says on a real disk device, decisions
depend on the seed and the call site only, and it is loud when on."""

import os
import threading

import pytest
import torch

from kvdrive.errors import CapacityError, KvdriveError
from kvdrive.storage import faults as fault_layer
from kvdrive.storage.disk import DiskDevice, ReadFailureWarning
from kvdrive.storage.faults import FaultInjectionWarning, FaultPlan, SeededFaults
from kvdrive.storage.host import HostTier
from kvdrive.storage.layout import GroupLayout

LAYOUT = GroupLayout(2, 2, 128, torch.float16, 4)  # a 4 KiB group fills its slot: every byte is checked
SB = LAYOUT.slot_bytes


def device(tmp_path, plan: FaultPlan, slots=8) -> DiskDevice:
    return DiskDevice(
        str(tmp_path), LAYOUT, slots * SB, extent_bytes=slots * SB, direct="off", faults=SeededFaults(plan)
    )


def round_trip(disk: DiskDevice, n=4, seed=0):
    host = HostTier(LAYOUT, n * SB, pin=False)
    host.rows.copy_(
        torch.randint(0, 256, host.rows.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    )
    slots = disk.alloc(n)
    wrote = disk.write(slots, [host.buffer(i) for i in range(n)]).result()
    back = HostTier(LAYOUT, n * SB, pin=False)
    read = [disk.read([s], [back.buffer(i)]).result()[0] for i, s in enumerate(slots)]
    gb = LAYOUT.group_bytes
    served_wrong = [r is None and not torch.equal(back.rows[i, :gb], host.rows[i, :gb]) for i, r in enumerate(read)]
    return wrote, read, served_wrong


def test_parse_and_refuse():
    plan = FaultPlan.parse("seed=7, eio=0.5, latency=0.25:20, vanish=9")
    assert (plan.seed, plan.eio, plan.latency, plan.latency_ms, plan.vanish) == (7, 0.5, 0.25, 20.0, 9)
    assert str(plan) == "seed=7,eio=0.5,latency=0.25,vanish=9"
    for bad in ("eio=2", "wobble=0.1", "eio=x", "vanish=-1"):
        with pytest.raises(KvdriveError, match="KVDRIVE_FAULTS"):
            FaultPlan.parse(bad)


@pytest.mark.parametrize(
    "plan, wrote, read",
    [
        (FaultPlan(eio=1), "io_error", "absent"),  # nothing written, nothing to read
        (FaultPlan(short=1), "io_error", "absent"),
        (FaultPlan(torn=1), None, "checksum"),  # silent: half the run is zeros on disk (or in the buffer read)
        (FaultPlan(flip=1), None, "checksum"),  # silent: a byte of the run flipped on disk, every read flipped too
    ],
)
def test_each_kind_is_a_miss_never_data(tmp_path, plan, wrote, read):
    disk = device(tmp_path, plan)
    try:
        with pytest.warns(ReadFailureWarning) if read == "checksum" else _nothing():
            w, r, wrong = round_trip(disk)
        assert set(w) == {wrote} and read in r and set(r) <= {None, read} and not any(wrong)
    finally:
        disk.close()


def test_transient_read_faults_are_recovered_by_the_retry(tmp_path):
    disk = device(tmp_path, FaultPlan(seed=3, flip=0.5, short=0.2, eio=0.2))
    try:
        disk.faults.plan = FaultPlan()  # a clean write
        host = HostTier(LAYOUT, 8 * SB, pin=False)
        host.rows.random_(0, 255)
        slots = disk.alloc(8)
        assert disk.write(slots, [host.buffer(i) for i in range(8)]).result() == [None] * 8
        disk.faults.plan = FaultPlan(seed=3, flip=0.5, short=0.2, eio=0.2)
        back = HostTier(LAYOUT, 8 * SB, pin=False)
        results = []
        for _ in range(10):
            results += disk.read(slots, [back.buffer(i) for i in range(8)]).result()
            gb = LAYOUT.group_bytes
            assert all(
                r is not None or torch.equal(back.rows[i, :gb], host.rows[i, :gb]) for i, r in enumerate(results[-8:])
            )
        assert results.count(None) > len(results) // 2 and sum(disk.faults.fired.values()) > 10
    finally:
        disk.close()


def test_decisions_depend_on_seed_and_call_site_not_thread_order():
    def decisions(plan, order):
        f = SeededFaults(plan)
        out = {}
        for off in order:
            try:
                out[off] = f.before("read", "/d/kvdrive-x-0.extent", off, 100)
            except OSError:
                out[off] = "eio"
        return out

    plan = FaultPlan(seed=11, eio=0.3, short=0.3)
    offsets = list(range(0, 64 * 4096, 4096))
    assert decisions(plan, offsets) == decisions(plan, offsets[::-1])
    assert decisions(plan, offsets) != decisions(FaultPlan(seed=12, eio=0.3, short=0.3), offsets)
    f, errors = SeededFaults(FaultPlan(seed=1, eio=0.5)), []

    def hammer():
        for off in offsets:
            try:
                f.before("read", "p", off, 10)
            except OSError:
                errors.append(off)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert f.fired["eio"] == len(errors) and 0 < len(errors) < 4 * len(offsets)


def test_a_vanishing_disk_fails_everything_after_n_calls(tmp_path):
    disk = device(tmp_path, FaultPlan(vanish=3))  # fallocate, write, read; then gone
    try:
        w, r, _ = round_trip(disk, n=1)
        assert w == [None] and r == [None]
        back = HostTier(LAYOUT, SB, pin=False)
        with pytest.warns(ReadFailureWarning):
            assert disk.read([0], [back.buffer(0)]).result() == ["io_error"]
        assert disk.write([1], [back.buffer(0)]).result() == ["io_error"]
        assert disk.faults.fired["vanish"] == 4  # the read and the write, each tried twice
    finally:
        disk.close()


@pytest.mark.parametrize("kind", ["enospc", "efbig"])
def test_a_full_file_system_or_size_limit_stops_growth(tmp_path, kind):
    disk = device(tmp_path, FaultPlan(**{kind: 1.0}))
    try:
        with pytest.raises(CapacityError, match="No space|too large|ENOSPC|EFBIG"):
            disk.alloc(1)
        assert disk.full_reason and not [f for f in os.listdir(tmp_path) if f.endswith(".extent")]
    finally:
        disk.close()


def test_a_host_arena_that_cannot_be_allocated_is_a_capacity_error(monkeypatch):
    monkeypatch.setenv(fault_layer.ENV, "nomem=1")
    with pytest.warns(FaultInjectionWarning), pytest.raises(CapacityError, match="host budget"):
        HostTier(LAYOUT, 4 * SB, pin=False)


def test_on_only_when_asked_and_loud(tmp_path, monkeypatch):
    monkeypatch.delenv(fault_layer.ENV, raising=False)
    clean = DiskDevice(str(tmp_path), LAYOUT, 4 * SB)
    assert type(clean.faults).__name__ == "NoFaults"
    clean.close()
    monkeypatch.setenv(fault_layer.ENV, "seed=5,flip=0.001")
    with pytest.warns(FaultInjectionWarning, match="fault-injection run"):
        loud = DiskDevice(str(tmp_path), LAYOUT, 4 * SB)
    assert isinstance(loud.faults, SeededFaults) and loud.faults.plan.seed == 5
    loud.close()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
