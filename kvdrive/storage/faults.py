"""Seeded fault injection for the disk tier, the prefix pool's disks and host arenas.

Off by default. ``KVDRIVE_FAULTS="seed=7,eio=0.02,flip=0.01,latency=0.01:20,vanish=400"``
(or ``FaultPlan.parse`` of the same text) makes every ``DiskDevice`` opened afterwards
consult a ``SeededFaults`` before each read, write and extent creation, and every host
arena before its allocation; the first one warns (``FaultInjectionWarning``), so a run
with faults is never mistaken for a clean one. Kinds (rates are per call, 0..1):

  eio      the call fails with EIO (read, write)
  enospc   extent creation (and writes) fail with ENOSPC: a full file system
  efbig    extent creation (and writes) fail with EFBIG: a file-size limit
  short    the call moves half its bytes and says so (a short read or write)
  torn     it moves every byte but half of them are zeros, silently: a torn write on
           disk (the caller's checksum is of the whole data), or a torn read in flight
  flip     one byte flips, silently: on a write it reaches the disk, on a read the buffer
  latency  the call first sleeps ``latency_ms`` (``latency=rate:ms``; default 50 ms)
  vanish   after this many calls on a path every call there fails with EIO: a disk gone
  nomem    a host arena's allocation fails with ENOMEM

Each decision is a hash of (seed, kind, file name, offset, how many times this call site
was hit), not a shared random stream, so a run's faults do not depend on how its I/O
threads interleave. ``fired`` counts what was injected, by kind.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, fields

import xxhash

from kvdrive.errors import KvdriveError
from kvdrive.storage.io_engine import IoFaults

ENV = "KVDRIVE_FAULTS"
_PRIVATE = re.compile(r"^kvdrive-\d+-[0-9a-f]{8}-")  # a private device's file names (dir_lock)
RATES = ("eio", "enospc", "efbig", "short", "torn", "flip", "latency", "nomem")
_total: Counter = Counter()  # faults injected in this process, by kind (every SeededFaults)
_total_lock = threading.Lock()
_warned: set[str] = set()  # the KVDRIVE_FAULTS texts warned about


class FaultInjectionWarning(UserWarning):
    """Faults are being injected (``KVDRIVE_FAULTS``): this run is a test, not a clean run."""


@dataclass(frozen=True)
class FaultPlan:
    """Which faults to inject, and how often (see the module doc)."""

    seed: int = 0
    eio: float = 0.0
    enospc: float = 0.0
    efbig: float = 0.0
    short: float = 0.0
    torn: float = 0.0
    flip: float = 0.0
    latency: float = 0.0
    latency_ms: float = 50.0
    vanish: int = 0  # calls on a path before it is gone; 0: never
    nomem: float = 0.0

    def __post_init__(self):
        for name in RATES:
            if not 0 <= getattr(self, name) <= 1:
                raise KvdriveError(f"{ENV}: {name} is a rate in 0..1, got {getattr(self, name)}")
        if self.latency_ms < 0 or self.vanish < 0:
            raise KvdriveError(f"{ENV}: latency ms and vanish must be >= 0")

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        """``"seed=7,eio=0.02,latency=0.01:20,vanish=400"`` -> a plan."""
        kw: dict = {}
        names = {f.name for f in fields(cls)}
        for item in filter(None, (x.strip() for x in text.split(","))):
            key, _, value = item.partition("=")
            try:
                if key == "latency" and ":" in value:
                    rate, ms = value.split(":", 1)
                    kw["latency"], kw["latency_ms"] = float(rate), float(ms)
                elif key in ("seed", "vanish"):
                    kw[key] = int(value)
                elif key in names:
                    kw[key] = float(value)
                else:
                    raise ValueError
            except ValueError:
                raise KvdriveError(
                    f"{ENV}: cannot read {item!r}; e.g. {ENV}='seed=1,eio=0.01,flip=0.01,"
                    f"latency=0.01:20,vanish=500' (kinds: {', '.join(RATES)}, vanish)"
                ) from None
        return cls(**kw)

    def __str__(self) -> str:
        on = [
            f"{f.name}={getattr(self, f.name)}"
            for f in fields(self)
            if f.name != "latency_ms" and getattr(self, f.name)
        ]
        return ",".join(on) or "none"


class SeededFaults(IoFaults):
    """An ``IoFaults`` that draws from a ``FaultPlan`` (thread-safe)."""

    def __init__(self, plan: FaultPlan):
        self.plan = plan
        self.fired: Counter = Counter()
        self._hits: Counter = Counter()  # (op, file, offset) -> calls so far
        self._calls: Counter = Counter()  # file -> calls so far (vanish)
        self._lock = threading.Lock()

    def _draw(self, kind: str, op: str, path: str, offset: int) -> float:
        """A uniform number in [0, 1) for this call site's current hit."""
        name = _PRIVATE.sub("kvdrive-", os.path.basename(path))  # the same in every run: no pid, no uuid
        key = f"{self.plan.seed}|{kind}|{op}|{name}|{offset}|{self._hits[op, path, offset]}"
        return xxhash.xxh64_intdigest(key.encode()) / 2**64

    def _fires(self, kind: str, op: str, path: str, offset: int) -> bool:
        rate = getattr(self.plan, kind)
        if rate and self._draw(kind, op, path, offset) < rate:
            self._count(kind)
            return True
        return False

    def _count(self, kind: str) -> None:
        self.fired[kind] += 1
        with _total_lock:
            _total[kind] += 1

    def before(self, op: str, path: str, offset: int, nbytes: int) -> int:
        if op not in ("read", "write", "fallocate", "alloc"):
            return nbytes  # the O_DIRECT probe is left alone
        with self._lock:
            self._hits[op, path, offset] += 1
            self._calls[path] += 1
            if self.plan.vanish and self._calls[path] > self.plan.vanish and op != "alloc":
                self._count("vanish")
                raise OSError(errno.EIO, "injected: the disk is gone", path)
            if op == "alloc":
                if self._fires("nomem", op, path, offset):
                    raise OSError(errno.ENOMEM, "injected ENOMEM", path)
                return nbytes
            sleep = self._fires("latency", op, path, offset)
            error = next(
                (
                    code
                    for kind, code in (("enospc", errno.ENOSPC), ("efbig", errno.EFBIG))
                    if op != "read" and self._fires(kind, op, path, offset)
                ),
                None,
            )
            if error is None and op != "fallocate" and self._fires("eio", op, path, offset):
                error = errno.EIO
            short = error is None and op != "fallocate" and self._fires("short", op, path, offset)
        if sleep:
            time.sleep(self.plan.latency_ms / 1e3)
        if error is not None:
            raise OSError(error, f"injected {errno.errorcode[error]}", path)
        return nbytes // 2 if short else nbytes

    def on_write(self, path: str, offset: int, bufs: list) -> list:
        with self._lock:
            torn = self._fires("torn", "write", path, offset)
            flip = not torn and self._fires("flip", "write", path, offset)
            at = self._draw("at", "write", path, offset)
        if not (torn or flip):
            return bufs
        out = []  # page-aligned copies: O_DIRECT writes need aligned buffers
        for b in bufs:
            mem = mmap.mmap(-1, len(b))
            mem[:] = bytes(b)
            out.append(memoryview(mem))
        _corrupt(out, torn, at)
        return out

    def on_read(self, path: str, offset: int, bufs: list) -> None:
        with self._lock:
            torn = self._fires("torn", "read", path, offset)
            flip = not torn and self._fires("flip", "read", path, offset)
            at = self._draw("at", "read", path, offset)
        if torn or flip:
            _corrupt(bufs, torn, at)


def _corrupt(bufs: list, torn: bool, at: float) -> None:
    """Zero the second half of the bytes of ``bufs`` (``torn``), or flip the byte at ``at`` of them."""
    total = sum(len(b) for b in bufs)
    lo, hi = (total // 2, total) if torn else (int(at * total // 2), int(at * total // 2) + 1)
    pos = 0
    for b in bufs:
        view = memoryview(b).cast("B")
        a, z = max(lo - pos, 0), min(hi - pos, len(view))
        if a < z:
            view[a:z] = bytes(z - a) if torn else bytes([view[a] ^ 0xFF])
        pos += len(view)


def from_env() -> SeededFaults | None:
    """A fresh ``SeededFaults`` of ``$KVDRIVE_FAULTS`` (None when unset); warns once per setting."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return None
    faults = SeededFaults(FaultPlan.parse(text))
    if text not in _warned:
        _warned.add(text)
        warnings.warn(
            f"{ENV}={text}: injecting faults ({faults.plan}) into disk and host-arena I/O: this is a "
            "fault-injection run",
            FaultInjectionWarning,
            stacklevel=3,
        )
    return faults


def fired() -> Counter:
    """Faults injected in this process so far, by kind (a copy)."""
    with _total_lock:
        return Counter(_total)
