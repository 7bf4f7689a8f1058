"""Probing a disk path: does it take O_DIRECT, and how fast does it move groups?

``probe_direct`` opens, writes and reads back one aligned block with O_DIRECT. File
systems that refuse (EINVAL on open or on I/O, e.g. older tmpfs, some FUSE and
network mounts) are reported, never hidden. ``kvdrive probe PATH...``
(``kvdrive.commands.probe.measure``) times random reads and sequential writes of whole
slots at a given size and queue depth; ``save``/``load`` keep the result in
``PATH/.kvdrive-probe.json`` so the pool can weight its stripes without measuring again.
"""

from __future__ import annotations

import json
import mmap
import os
import uuid
from dataclasses import asdict, dataclass

from kvdrive.storage.layout import ALIGN

PROBE_FILE = ".kvdrive-probe.json"


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
