"""The unified disk pool: several paths as one array of slots, striped by bandwidth.

New groups are spread over the devices by smooth weighted round-robin, weights in
proportion to each device's measured read bandwidth (``kvdrive probe``, else equal),
so a step that reads any sizeable set of groups keeps every device busy at once and
each finishes its share at about the same time. A full device drops out of the
rotation; only when all are full does ``alloc`` raise ``CapacityError``.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from kvdrive.errors import CapacityError, KvdriveError
from kvdrive.storage import probe
from kvdrive.storage.disk import DiskDevice
from kvdrive.storage.io_engine import BatchFuture
from kvdrive.storage.layout import GroupLayout


class DiskAddr(NamedTuple):
    device: int  # index into the pool's devices
    slot: int


@dataclass(frozen=True)
class PoolPath:
    """One member of the pool: a directory on a device and its byte budget there."""

    path: str
    budget_bytes: int
    weight: float | None = None  # None: read GB/s from the path's probe file, else 1.0

    def __post_init__(self):
        if self.budget_bytes < 0:
            raise KvdriveError(f"{self.path}: disk budget must be >= 0, got {self.budget_bytes}")
        if self.weight is not None and self.weight <= 0:
            raise KvdriveError(f"{self.path}: weight must be positive, got {self.weight}")


def check_dir(path: str, what: str = "--disk") -> None:
    """Refuse, before anything loads, a disk path kvdrive cannot keep files in: missing, not a
    directory, or not writable (a read-only mount, /proc): one file is created and removed."""
    if not isinstance(path, str) or not path:
        raise KvdriveError(f"{what} must be a directory path, got {path!r}")
    if not os.path.isdir(path):
        raise KvdriveError(f"{what} {path!r} is not a directory: create it (mkdir -p {path}) or give another")
    probe_file = os.path.join(path, f".kvdrive-write-check-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(probe_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
            os.unlink(probe_file)
    except OSError as err:
        raise KvdriveError(
            f"{what} {path!r} cannot hold kvdrive's files ({err.strerror or err}): give a writable "
            "directory on a local disk"
        ) from None


class DiskPool:
    def __init__(self, devices: list[DiskDevice], weights: list[float]):
        if not devices or len(devices) != len(weights):
            raise KvdriveError("a disk pool needs at least one device and one weight per device")
        self.devices = devices
        self.weights = [float(w) for w in weights]
        self._credit = [0.0] * len(devices)

    @classmethod
    def open(cls, paths: list[PoolPath], layout: GroupLayout, **device_kwargs) -> DiskPool:
        devices, weights = [], []
        try:
            for p in paths:
                devices.append(DiskDevice(p.path, layout, p.budget_bytes, **device_kwargs))
                measured = probe.load(p.path, layout.slot_bytes)
                weights.append(p.weight or (measured.read_gbps if measured else 1.0))
        except BaseException:
            for d in devices:
                d.close()
            raise
        return cls(devices, weights)

    @property
    def num_free(self) -> int:
        return sum(d.num_free for d in self.devices)

    @property
    def num_slots(self) -> int:
        return sum(d.num_slots for d in self.devices)

    def plan(self, n: int) -> list[int]:
        """Device of each of ``n`` new groups (smooth weighted round-robin over devices with room)."""
        room = [d.num_free for d in self.devices]
        if sum(room) < n:
            full = [d for d in self.devices if d.full_reason]
            # a file system that refused to grow is fixed there, not by a larger budget
            fix = (
                (
                    f"free space on {', '.join(d.path for d in full)} or add another --disk path ("
                    + "; ".join(f"{d.path}: {d.full_reason}" for d in full)
                    + ")"
                )
                if full
                else "raise the disk budget (--disk-gib) or free sequences"
            )
            raise CapacityError(
                f"disk pool: {n} group slots needed, {sum(room)} free on {len(self.devices)} path(s): {fix}"
            )
        credit = self._credit
        out = []
        for _ in range(n):
            live = [i for i, r in enumerate(room) if r > 0]
            total = sum(self.weights[i] for i in live)
            for i in live:
                credit[i] += self.weights[i]
            pick = max(live, key=credit.__getitem__)
            credit[pick] -= total
            room[pick] -= 1
            out.append(pick)
        return out

    def alloc(self, n: int) -> list[DiskAddr]:
        """``n`` slots striped over the devices, all or none."""
        while True:
            saved = list(self._credit)
            picks = self.plan(n)
            taken: dict[int, list[int]] = {}
            try:
                for dev in set(picks):
                    taken[dev] = self.devices[dev].alloc(picks.count(dev))
            except CapacityError:
                # A device could not grow (its file system filled up): give back, replan without it.
                for dev, slots in taken.items():
                    self.devices[dev].free(slots)
                self._credit = saved
                continue
            cursor = dict.fromkeys(taken, 0)
            out = []
            for dev in picks:
                out.append(DiskAddr(dev, taken[dev][cursor[dev]]))
                cursor[dev] += 1
            return out

    def free(self, addrs) -> None:
        for dev, (_, slots, _) in self._by_device(addrs, [None] * len(addrs)).items():
            self.devices[dev].free(slots)

    def read(self, addrs: list[DiskAddr], bufs: list) -> BatchFuture:
        """Issue every device's share at once; result per addr: None or a miss reason."""
        return BatchFuture(
            len(addrs),
            [(idx, self.devices[dev].read(slots, b)) for dev, (idx, slots, b) in self._by_device(addrs, bufs).items()],
        )

    def read_to(self, devs: np.ndarray, slots: np.ndarray, dsts: np.ndarray) -> BatchFuture:
        """``read`` of slot ``slots[i]`` of device ``devs[i]`` into host memory at ``dsts[i]``
        (``DiskDevice.read_to``): arrays in, no Python object per read on the way."""
        return self._per_device(devs, lambda d, idx: d.read_to(np.asarray(slots)[idx], np.asarray(dsts)[idx]))

    def write_from(self, devs: np.ndarray, slots: np.ndarray, srcs: np.ndarray, before=None) -> BatchFuture:
        """``write`` to slot ``slots[i]`` of device ``devs[i]`` from host memory at ``srcs[i]``."""
        return self._per_device(
            devs, lambda d, idx: d.write_from(np.asarray(slots)[idx], np.asarray(srcs)[idx], before)
        )

    def _per_device(self, devs: np.ndarray, submit) -> BatchFuture:
        devs = np.asarray(devs, dtype=np.int64)
        parts = []
        for dev in np.unique(devs).tolist():
            idx = np.flatnonzero(devs == dev)
            parts.append((idx.tolist(), submit(self.devices[dev], idx)))
        return BatchFuture(len(devs), parts)

    def write(self, addrs: list[DiskAddr], bufs: list, before=None) -> BatchFuture:
        return BatchFuture(
            len(addrs),
            [
                (idx, self.devices[dev].write(slots, b, before))
                for dev, (idx, slots, b) in self._by_device(addrs, bufs).items()
            ],
        )

    @staticmethod
    def _by_device(addrs, bufs) -> dict[int, tuple[list[int], list[int], list]]:
        out: dict[int, tuple[list[int], list[int], list]] = {}
        for i, (a, b) in enumerate(zip(addrs, bufs)):
            idx, slots, bs = out.setdefault(a.device, ([], [], []))
            idx.append(i)
            slots.append(a.slot)
            bs.append(b)
        return out

    def bytes_used(self) -> int:
        return sum(d.bytes_used for d in self.devices)

    def bytes_capacity(self) -> int:
        return sum(d.num_slots for d in self.devices) * self.devices[0].layout.slot_bytes

    def physical_bytes(self) -> int:
        return sum(d.physical_bytes() for d in self.devices)

    def close(self, remove: bool | None = None) -> None:
        for d in self.devices:
            d.close(remove)
