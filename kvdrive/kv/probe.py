"""Probing a disk path: does it take O_DIRECT, and how fast does it move groups?

``probe_direct`` opens, writes and reads back one aligned block with O_DIRECT. File
systems that refuse (EINVAL on open or on I/O, e.g. older tmpfs, some FUSE and
network mounts) are reported, never hidden. ``measure`` times random reads and
sequential writes of whole slots at a given size and queue depth, and
``save``/``load`` keep the result in ``PATH/.kvdrive-probe.json`` so the pool can
weight its stripes without measuring again. ``kvdrive probe PATH...`` runs it.

``measure`` also times single reads one at a time (``read_latency_ms``, the median): a
tiered decode step waits at least one such read for every layer whose selection needs the
disk, so on a disk with millisecond reads the SSD tier is bound by latency, not bandwidth
(docs/bench.md, stop 14: 1-2 ms per read on the lent H200 machine's disk).
"""

from __future__ import annotations

import json
import mmap
import os
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np

from kvdrive.kv.layout import ALIGN

PROBE_FILE = ".kvdrive-probe.json"
DEFAULT_PROBE_BYTES = 256 << 20
DEFAULT_SLOT_BYTES = 64 << 10
DEFAULT_DEPTH = 32
LATENCY_READS = 64  # single reads timed one at a time for read_latency_ms
SLOW_READ_MS = 0.5  # a local NVMe reads a slot in ~0.1 ms; network volumes take milliseconds


class DirectIOWarning(UserWarning):
    """O_DIRECT was refused on a path; kvdrive falls back to buffered I/O there."""


@dataclass(frozen=True)
class DirectProbe:
    ok: bool
    reason: str  # empty when ok


@dataclass(frozen=True)
class DeviceProbe:
    """Measured bandwidth of one path at one slot size."""

    path: str
    slot_bytes: int
    direct: bool
    read_gbps: float  # random whole-slot reads at queue depth ``depth``
    write_gbps: float  # sequential whole-slot writes
    depth: int
    probe_bytes: int
    date: str
    read_latency_ms: float | None = None  # median of single random slot reads, one at a time


def probe_direct(path: str, faults=None) -> DirectProbe:
    """Try one aligned O_DIRECT write + read in ``path``; the test file is removed."""
    name = os.path.join(path, f".kvdrive-odirect-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # pid: swept if it dies
    buf = mmap.mmap(-1, ALIGN)  # page-aligned
    fd = -1
    try:
        if faults is not None:
            faults.before("open_direct", name, 0, ALIGN)
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
        if os.pwritev(fd, [buf], 0) != ALIGN or os.preadv(fd, [buf], 0) != ALIGN:
            return DirectProbe(False, "short O_DIRECT transfer")
        return DirectProbe(True, "")
    except OSError as err:
        return DirectProbe(False, f"{err.strerror or err} (errno {err.errno})")
    finally:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(name):
            os.unlink(name)
        buf.close()


def measure(path: str, slot_bytes: int = DEFAULT_SLOT_BYTES, probe_bytes: int = DEFAULT_PROBE_BYTES,
            depth: int = DEFAULT_DEPTH, seed: int = 0) -> DeviceProbe:
    """Write ``probe_bytes`` sequentially, then read as many random slots, through a real ``DiskDevice``."""
    import torch

    from kvdrive.kv.disk import DiskDevice
    from kvdrive.kv.host import HostTier
    from kvdrive.kv.layout import GroupLayout

    # A layout whose group is exactly ``slot_bytes``: 1 head x 1 token x slot_bytes/8 int16 dims x K|V.
    layout = GroupLayout(1, 1, slot_bytes // 4, torch.int16, 1)
    n = max(depth, probe_bytes // slot_bytes)
    host_slots = min(n, 4 * depth)
    host = HostTier(layout, host_slots * slot_bytes, pin=False)
    host.rows.copy_(torch.randint(0, 255, host.rows.shape, dtype=torch.uint8))
    disk = DiskDevice(path, layout, n * slot_bytes, read_depth=depth, write_depth=depth)
    try:
        slots = disk.alloc(n)
        bufs = [host.buffer(i % host_slots) for i in range(n)]
        t0 = time.perf_counter()
        assert all(r is None for r in disk.write(slots, bufs).result())
        write_s = time.perf_counter() - t0
        order = np.random.default_rng(seed).permutation(n)
        t0 = time.perf_counter()
        disk.read([slots[i] for i in order], [bufs[i] for i in range(n)]).result()
        read_s = time.perf_counter() - t0
        single = []
        for i in order[:LATENCY_READS]:  # one read in flight: what a layer that needs one group waits
            t1 = time.perf_counter()
            disk.read([slots[i]], [bufs[0]]).result()
            single.append(time.perf_counter() - t1)
        total = n * slot_bytes
        return DeviceProbe(path, slot_bytes, disk.direct, total / read_s / 1e9, total / write_s / 1e9, depth,
                           total, time.strftime("%Y-%m-%dT%H:%M:%S"), float(np.median(single)) * 1e3)
    finally:
        disk.close()


def save(probe: DeviceProbe) -> str:
    """Merge ``probe`` into ``PATH/.kvdrive-probe.json`` (one entry per slot size)."""
    file = os.path.join(probe.path, PROBE_FILE)
    doc = _read(file)
    doc[str(probe.slot_bytes)] = asdict(probe)
    with open(file + ".tmp", "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(file + ".tmp", file)
    return file


def load(path: str, slot_bytes: int) -> DeviceProbe | None:
    """The stored probe of ``path`` at the size nearest ``slot_bytes``, or None."""
    doc = _read(os.path.join(path, PROBE_FILE))
    if not doc:
        return None
    best = min(doc, key=lambda k: abs(int(k) - slot_bytes))
    return DeviceProbe(**doc[best])


def _read(file: str) -> dict:
    try:
        with open(file) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


# -- ``kvdrive probe PATH...`` ----------------------------------------------------------


def add_parser(sub) -> None:
    p = sub.add_parser("probe", help="measure disk paths for the KV pool and store the result",
                       description="Measure O_DIRECT support and read/write GB/s of each PATH at the group "
                                   f"size; stores PATH/{PROBE_FILE}, which the KV pool uses to weight stripes.")
    from kvdrive.commands.common import number

    p.add_argument("paths", nargs="+", metavar="PATH", help="directories on the devices to pool")
    p.add_argument("--slot-kib", type=number(int, ALIGN >> 10, 1 << 20, example="64"),
                   default=DEFAULT_SLOT_BYTES >> 10, help="group size in KiB, a multiple of 4 (default 64)")
    p.add_argument("--mib", type=number(int, 1, example="256"), default=DEFAULT_PROBE_BYTES >> 20,
                   help="MiB written and read (default 256)")
    p.add_argument("--depth", type=number(int, 1, 1024, example="32"), default=DEFAULT_DEPTH,
                   help="I/O queue depth (default 32)")
    p.set_defaults(func=run)


def run(args) -> int:
    from kvdrive.errors import KvdriveError
    from kvdrive.kv.pool import check_dir

    if (args.slot_kib << 10) % ALIGN:
        raise KvdriveError(f"--slot-kib must be a multiple of {ALIGN >> 10} (O_DIRECT alignment), got {args.slot_kib}; "
                           f"e.g. --slot-kib {max(ALIGN, (args.slot_kib << 10) // ALIGN * ALIGN) >> 10}")
    if args.mib << 20 < args.slot_kib << 10:
        raise KvdriveError(f"--mib {args.mib} is less than one slot of --slot-kib {args.slot_kib}: nothing to time; "
                           f"e.g. --mib 256")
    for path in args.paths:
        check_dir(path, "probe PATH")  # every path, before any is measured
    for path in args.paths:
        d = probe_direct(path)
        if not d.ok:
            print(f"{path}: O_DIRECT REFUSED ({d.reason}); buffered I/O with page-cache dropping will be used")
        p = measure(path, args.slot_kib << 10, args.mib << 20, args.depth)
        print(f"{path}: read {p.read_gbps:.2f} GB/s, write {p.write_gbps:.2f} GB/s at {args.slot_kib} KiB, "
              f"depth {p.depth}, direct={p.direct}; one read alone {p.read_latency_ms:.3f} ms -> {save(p)}")
        if p.read_latency_ms > SLOW_READ_MS:
            print(f"{path}: reads take {p.read_latency_ms:.1f} ms: a decode step waits about that long for every "
                  "layer that needs the disk, so keep the hot KV in host memory (a larger --host-gib) or use "
                  "a local NVMe")
    return 0
