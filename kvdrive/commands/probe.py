"""``kvdrive probe PATH...``: measure disk paths for the KV pool and store the result.

``measure`` times random reads and sequential writes of whole slots at a given size and
queue depth through a real ``DiskDevice``, and single reads one at a time
(``read_latency_ms``, the median): a tiered decode step waits at least one such read for
every layer whose selection needs the disk, so on a disk with millisecond reads the SSD
tier is bound by latency, not bandwidth. The result goes to ``PATH/.kvdrive-probe.json``
(``kvdrive.storage.probe``), which the disk pool reads to weight its stripes.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from kvdrive.commands.common import number
from kvdrive.errors import KvdriveError
from kvdrive.storage.disk import DiskDevice
from kvdrive.storage.host import HostTier
from kvdrive.storage.layout import ALIGN, GroupLayout
from kvdrive.storage.pool import check_dir
from kvdrive.storage.probe import PROBE_FILE, DeviceProbe, probe_direct, save

DEFAULT_PROBE_BYTES = 256 << 20
DEFAULT_SLOT_BYTES = 64 << 10
DEFAULT_DEPTH = 32
LATENCY_READS = 64  # single reads timed one at a time for read_latency_ms
SLOW_READ_MS = 0.5  # a local NVMe reads a slot in ~0.1 ms; network volumes take milliseconds


def measure(
    path: str,
    slot_bytes: int = DEFAULT_SLOT_BYTES,
    probe_bytes: int = DEFAULT_PROBE_BYTES,
    depth: int = DEFAULT_DEPTH,
    seed: int = 0,
) -> DeviceProbe:
    """Write ``probe_bytes`` sequentially, then read as many random slots, through a real ``DiskDevice``."""
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
        for lo in range(
            0, n, host_slots
        ):  # a batch's reads land in distinct buffers, or one's check sees another's bytes
            part = order[lo : lo + host_slots]
            disk.read([slots[i] for i in part], [host.buffer(j) for j in range(len(part))]).result()
        read_s = time.perf_counter() - t0
        single = []
        for i in order[:LATENCY_READS]:  # one read in flight: what a layer that needs one group waits
            t1 = time.perf_counter()
            disk.read([slots[i]], [bufs[0]]).result()
            single.append(time.perf_counter() - t1)
        total = n * slot_bytes
        return DeviceProbe(
            path,
            slot_bytes,
            disk.direct,
            total / read_s / 1e9,
            total / write_s / 1e9,
            depth,
            total,
            time.strftime("%Y-%m-%dT%H:%M:%S"),
            float(np.median(single)) * 1e3,
        )
    finally:
        disk.close()


def add_parser(sub) -> None:
    p = sub.add_parser(
        "probe",
        help="measure disk paths for the KV pool and store the result",
        description="Measure O_DIRECT support and read/write GB/s of each PATH at the group "
        f"size; stores PATH/{PROBE_FILE}, which the KV pool uses to weight stripes.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="directories on the devices to pool")
    p.add_argument(
        "--slot-kib",
        type=number(int, ALIGN >> 10, 1 << 20, example="64"),
        default=DEFAULT_SLOT_BYTES >> 10,
        help="group size in KiB, a multiple of 4 (default 64)",
    )
    p.add_argument(
        "--mib",
        type=number(int, 1, example="256"),
        default=DEFAULT_PROBE_BYTES >> 20,
        help="MiB written and read (default 256)",
    )
    p.add_argument(
        "--depth", type=number(int, 1, 1024, example="32"), default=DEFAULT_DEPTH, help="I/O queue depth (default 32)"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    if (args.slot_kib << 10) % ALIGN:
        raise KvdriveError(
            f"--slot-kib must be a multiple of {ALIGN >> 10} (O_DIRECT alignment), got {args.slot_kib}; "
            f"e.g. --slot-kib {max(ALIGN, (args.slot_kib << 10) // ALIGN * ALIGN) >> 10}"
        )
    if args.mib << 20 < args.slot_kib << 10:
        raise KvdriveError(
            f"--mib {args.mib} is less than one slot of --slot-kib {args.slot_kib}: nothing to time; e.g. --mib 256"
        )
    for path in args.paths:
        check_dir(path, "probe PATH")  # every path, before any is measured
    for path in args.paths:
        d = probe_direct(path)
        if not d.ok:
            print(f"{path}: O_DIRECT REFUSED ({d.reason}); buffered I/O with page-cache dropping will be used")
        p = measure(path, args.slot_kib << 10, args.mib << 20, args.depth)
        print(
            f"{path}: read {p.read_gbps:.2f} GB/s, write {p.write_gbps:.2f} GB/s at {args.slot_kib} KiB, "
            f"depth {p.depth}, direct={p.direct}; one read alone {p.read_latency_ms:.3f} ms -> {save(p)}"
        )
        if p.read_latency_ms > SLOW_READ_MS:
            print(
                f"{path}: reads take {p.read_latency_ms:.1f} ms: a decode step waits about that long for every "
                "layer that needs the disk, so keep the hot KV in host memory (a larger --host-gib) or use "
                "a local NVMe"
            )
    return 0
