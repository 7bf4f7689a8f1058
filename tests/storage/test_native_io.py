"""The native batched reader (kvdrive.storage.native_io) and DiskDevice.read_to, which uses it."""

import errno
import os
import warnings

import numpy as np
import pytest
import torch

from kvdrive.storage import native_io
from kvdrive.storage.disk import DiskDevice
from kvdrive.storage.host import HostTier
from kvdrive.storage.layout import GroupLayout

LAYOUT = GroupLayout(2, 2, 16, torch.float16, 4)  # 512 B group in a 4 KiB slot
SB = LAYOUT.slot_bytes


@pytest.fixture
def fn():
    f = native_io.reader()
    if f is None:
        pytest.fail("the native reader did not build: this machine has a C compiler (CI installs gcc)")
    return f


@pytest.fixture(params=["native", "native_python_hash", "python"])
def path(request, monkeypatch):
    """read_to/write_from through the native batch (checksums in its threads, or in Python where
    the xxhash build exports no XXH3_64bits), and through the Python fallback they must agree with."""
    if request.param == "python":
        monkeypatch.setattr(native_io, "reader", lambda: None)
    if request.param == "native_python_hash":
        monkeypatch.setattr(native_io, "xxh3_address", lambda: None)
    return request.param


def filled_disk(tmp_path, n):
    disk = DiskDevice(str(tmp_path), LAYOUT, 16 * SB, extent_bytes=4 * SB)
    src = HostTier(LAYOUT, n * SB, pin=False)
    src.rows.copy_(torch.randint(0, 256, src.rows.shape, generator=torch.Generator().manual_seed(1), dtype=torch.uint8))
    slots = disk.alloc(n)
    assert disk.write(slots, [src.buffer(i) for i in range(n)]).result() == [None] * n
    return disk, src, slots


def addresses(host: HostTier, rows) -> np.ndarray:
    return np.asarray(rows, dtype=np.uint64) * np.uint64(SB) + np.uint64(host.rows.data_ptr())


def same_groups(a: HostTier, a_rows, b: HostTier, b_rows) -> bool:
    gb = LAYOUT.group_bytes
    return all(torch.equal(a.rows[i, :gb], b.rows[j, :gb]) for i, j in zip(a_rows, b_rows))


def test_transfer_batch_runs_land_in_their_buffers(tmp_path, fn):
    data = np.random.default_rng(0).integers(0, 256, 8 * SB, dtype=np.uint8)
    path = tmp_path / "f"
    path.write_bytes(data.tobytes())
    dst = np.zeros((8, SB), dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        # run 0: file slots 5, 6 into rows 1, 0 (one preadv, two iovecs); run 1: slot 2 into row 7
        bases = np.uint64(dst.ctypes.data) + np.array([1, 0, 7], dtype=np.uint64) * np.uint64(SB)
        status, secs, _ = native_io.transfer_batch(
            fn, [fd, fd], [5 * SB, 2 * SB], [0, 2, 3], bases, [SB] * 3, threads=4, dontneed=True
        )
    finally:
        os.close(fd)
    assert status.tolist() == [0, 0] and (secs >= 0).all()
    chunks = data.reshape(8, SB)
    assert (dst[1] == chunks[5]).all() and (dst[0] == chunks[6]).all() and (dst[7] == chunks[2]).all()
    assert not dst[2:7].any()


def test_transfer_batch_reports_short_reads_and_errors(tmp_path, fn):
    path = tmp_path / "f"
    path.write_bytes(bytes(SB))
    dst = np.zeros((2, SB), dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        bases = np.uint64(dst.ctypes.data) + np.array([0, 1], dtype=np.uint64) * np.uint64(SB)
        status, _, _ = native_io.transfer_batch(
            fn, [fd, 10_000], [SB, 0], [0, 1, 2], bases, [SB, SB], threads=2, dontneed=False
        )
    finally:
        os.close(fd)
    assert status.tolist() == [-1, errno.EBADF]  # past the end: short; a closed fd: its errno


def test_transfer_batch_checks_its_arguments(fn):
    with pytest.raises(ValueError, match="n_runs"):
        native_io.transfer_batch(fn, [0], [0], [0, 2], [0], [SB], threads=1, dontneed=False)
    with pytest.raises(ValueError, match="at most"):
        n = native_io.MAX_RUN_SLOTS + 1
        native_io.transfer_batch(fn, [0], [0], [0, n], [0] * n, [SB] * n, threads=1, dontneed=False)


def test_read_to_matches_the_written_bytes(tmp_path, path):
    disk, src, slots = filled_disk(tmp_path, 10)  # three extents: runs break at extent ends
    try:
        back = HostTier(LAYOUT, 12 * SB, pin=False)
        rows = [11, 3, 0, 5, 9, 1, 2, 8, 4, 6]  # scattered destinations, slots in file order
        res = disk.read_to(np.asarray(slots), addresses(back, rows)).result()
        assert res == [None] * 10
        assert same_groups(back, rows, src, range(10))
        assert disk.metrics.snapshot().moved["disk->host"].groups == 10
    finally:
        disk.close()


def test_read_to_refuses_corrupt_and_absent_slots(tmp_path, path):
    disk, _, slots = filled_disk(tmp_path, 6)
    try:
        ext, off = disk.locate(slots[2])
        with open(ext, "r+b") as f:  # flip one byte of slot 2's group behind kvdrive's back
            f.seek(off + 7)
            b = f.read(1)
            f.seek(off + 7)
            f.write(bytes([b[0] ^ 0xFF]))
        disk.free([slots[4]])
        back = HostTier(LAYOUT, 6 * SB, pin=False)
        res = disk.read_to(np.asarray(slots), addresses(back, range(6))).result()
        assert res == [None, None, "checksum", None, "absent", None]
    finally:
        disk.close()


def test_write_from_round_trips_and_checksums(tmp_path, path):
    disk = DiskDevice(str(tmp_path), LAYOUT, 16 * SB, extent_bytes=4 * SB)
    try:
        src = HostTier(LAYOUT, 9 * SB, pin=False)
        src.rows.copy_(
            torch.randint(0, 256, src.rows.shape, generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
        )
        slots = np.asarray(disk.alloc(9))[::-1].copy()  # written out of order, across extents
        rows = [4, 0, 8, 2, 6, 1, 3, 7, 5]
        calls = []
        res = disk.write_from(slots, addresses(src, rows), before=lambda: calls.append(1)).result()
        assert res == [None] * 9 and calls
        back = HostTier(LAYOUT, 9 * SB, pin=False)
        assert disk.read(slots.tolist(), [back.buffer(i) for i in range(9)]).result() == [None] * 9
        assert same_groups(back, range(9), src, rows)
        assert disk.metrics.snapshot().moved["host->disk"].groups == 9
    finally:
        disk.close()


def test_native_checksums_are_the_xxhash_package_s(tmp_path, fn):
    """The threads' XXH3_64bits (by address from xxhash's extension) gives xxh3_64_intdigest's sums."""
    import xxhash

    assert native_io.xxh3_address() is not None, "xxhash's extension exports XXH3_64bits on Linux wheels"
    disk, src, slots = filled_disk(tmp_path, 5)  # written by write(): sums from Python
    try:
        gb = LAYOUT.group_bytes
        assert disk._sums[slots].tolist() == [xxhash.xxh3_64_intdigest(src.buffer(i)[:gb]) for i in range(5)]
        again = np.asarray(disk.alloc(5))
        assert disk.write_from(again, addresses(src, range(5))).result() == [None] * 5
        assert disk._sums[again].tolist() == disk._sums[slots].tolist()
    finally:
        disk.close()


def test_native_write_failure_is_reported_not_raised(tmp_path, fn):
    disk = DiskDevice(str(tmp_path), LAYOUT, 4 * SB, extent_bytes=4 * SB)
    try:
        slots = disk.alloc(2)
        src = HostTier(LAYOUT, 2 * SB, pin=False)
        fd = disk._fds[0]
        disk._fds[0] = os.open(disk._paths[0], os.O_RDONLY)  # the extent cannot be written through it
        try:
            res = disk.write_from(np.asarray(slots), addresses(src, [0, 1])).result()
        finally:
            os.close(disk._fds[0])
            disk._fds[0] = fd
        assert res == ["io_error", "io_error"]
        assert not disk._valid[slots].any()  # never read back as data
        back = HostTier(LAYOUT, 2 * SB, pin=False)
        assert disk.read_to(np.asarray(slots), addresses(back, [0, 1])).result() == ["absent", "absent"]
    finally:
        disk.close()


def test_no_compiler_warns_once_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("KVDRIVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native_io, "_state", {})
    with pytest.warns(native_io.NativeIOWarning, match="C compiler"):
        assert native_io.reader() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native_io.reader() is None  # decided once


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("KVDRIVE_NATIVE_IO", "0")
    monkeypatch.setattr(native_io, "_state", {})
    assert native_io.reader() is None
