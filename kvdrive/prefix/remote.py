"""The prefix pool's remote tier: chunks shared by every serving node through one store.

Objects: one per (chunk, layer), named ``<key_prefix><key hex>/<layer>``: the layer's KV,
``(2, H_kv, C, D)`` as ``stored_bytes``, then a 64-byte trailer that binds it to its place
(magic, key, layer, layer count, payload bytes, format, a digest of the layout name, and
the payload's xxh3_64 bound to (key, layer) by ``keys.bind_sums``). A read is served only
if every field is what the reader asked for; anything else is a miss (``remote_objects``:
the trailer, and the calls the workers make to read and write objects). The chunk key
already names the weights digest, dtype, layout, chunk size and tenant, so nodes share
exactly the chunks whose KV is interchangeable, and tenants never meet.

Store (behind): admitted chunks' KV is copied into a registered ring (the only work on the
request path); the write worker checks which are already present, seals the rest and
sends layers 0..L-2, then the last layer of each chunk whose other layers all landed: a
last layer present means its chunk was written whole. Admission: the ``admit_after``-th
sighting of a chunk, counting this node's and the ``<key>/seen`` markers every node
leaves, so a prefix seen once on each of two nodes is shared on the second.

Load: ``present`` asks in one call which chunks exist (their last layer) and were seen;
``RemoteRead`` (``remote_objects``) fetches layer l of every remote chunk in one batch into a registered
staging ring, ahead of the import like the disks' reads, and checks each on the worker.

Failure: every call runs on a worker thread under a deadline (``remote_io``); a timeout or
an unreachable master opens the breaker and the store is skipped for ``retry_after_s``.
A miss, a timeout or a bad value is a recompute, counted in ``stats()``: a request waits
at most one call's deadline for the store, and bad KV is never served.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvdrive.errors import KvdriveError
from kvdrive.prefix.config import RemoteConfig
from kvdrive.prefix.remote_io import Breaker, Refused, Timeout, Worker
from kvdrive.prefix.remote_objects import ROW_ALIGN, TRAILER_BYTES, RemoteRead, WriteJob, layout_digest, write
from kvdrive.prefix.remote_store import RemoteStore, StoreDown, open_store
from kvdrive.storage.io_buffers import Ring, aligned_empty
from kvdrive.storage.layout import GroupLayout, align_up

PER_CHUNK = ("corrupt", "absent", "size", "error")  # miss reasons of one chunk (others: the store as a whole)


@dataclass(frozen=True)
class RemoteStats:
    state: str  # "connecting", "connected", "down: <why>", "closed"
    breaker: str  # "closed" (calls go through) or "open" (the store is skipped)
    breaker_opens: int
    lookups: int  # lookups that asked the store
    chunks_present: int  # chunks those lookups found
    hits: int  # chunks loaded from the store
    hit_bytes: int
    misses: dict = field(default_factory=dict)  # reason -> chunks found but not served (corrupt, timeout, ...)
    failures: dict = field(default_factory=dict)  # reason -> store calls that failed (timeout, down, busy)
    skipped: dict = field(default_factory=dict)  # reason -> lookups not asked (breaker, not_connected, busy)
    written: int = 0  # chunks written to the store
    written_bytes: int = 0
    write_skipped: dict = field(default_factory=dict)  # reason -> chunks not written (present, buffer_full, ...)
    marks: int = 0  # sighting markers written
    wait_s: float = 0.0  # time requests spent waiting for the store, in total
    wait_max_s: float = 0.0  # the longest a request waited for one call


class RemoteTier:
    """The shared tier of one prefix pool (see the module doc); its methods never block longer
    than one store call's deadline. ``store``: a ``RemoteStore`` (default: by backend).
    ``warn(cause, message)``: told when the store stops answering (the pool warns once a cause)."""

    def __init__(
        self,
        layout: GroupLayout,
        config: RemoteConfig,
        store: RemoteStore | None = None,
        warn: Callable[[str, str], None] | None = None,
    ):
        self.layout, self.config = layout, config
        self._warn = warn or (lambda cause, message: None)
        self.num_layers = layout.num_layers
        self.value_bytes = layout.stored_bytes + TRAILER_BYTES
        self.row_bytes = align_up(self.value_bytes, ROW_ALIGN)
        if config.write_buffer_bytes < self.row_bytes:
            raise KvdriveError(
                f"prefix.remote.write_buffer_bytes ({config.write_buffer_bytes}) must hold at least one "
                f"object of this model's chunks ({self.row_bytes} bytes: one layer of one chunk)"
            )
        self._layout_digest = layout_digest(layout)
        self.store = store if store is not None else open_store(config)
        self.breaker = Breaker(config.retry_after_s)
        self._reads, self._writes = Worker("kvdrive-remote-read"), Worker("kvdrive-remote-write")
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self._wait_s = self._wait_max_s = 0.0  # time the request path spent waiting for the store
        self._states: OrderedDict[bytes, str] = OrderedDict()  # key -> "present" | "seen" | "bad"; LRU first
        self._sightings: OrderedDict[bytes, int] = OrderedDict()
        ring_rows = config.write_buffer_bytes // self.row_bytes
        self._ring = Ring(ring_rows)
        self._ring_buf = aligned_empty(ring_rows * self.row_bytes, torch.device("cpu"), pin=True)
        self._ring_rows = self._ring_buf.view(ring_rows, self.row_bytes)  # (R, row_bytes) uint8
        self._read_bufs: list[torch.Tensor] = []  # staging ring of reads, registered with the store
        self.state = "connecting"
        self._next_connect = 0.0
        self._connect()
        self._reads.idle(config.connect_wait_s)

    # -- connection ---------------------------------------------------------------------

    def _connect(self) -> None:
        """Join the store on the read worker (not waited for); the write ring is registered there."""
        self._next_connect = time.monotonic() + self.config.retry_after_s

        def connect():
            try:
                self.store.connect()
                self.store.register(self._ring_buf.data_ptr(), self._ring_buf.numel())
            except StoreDown as err:
                self.state = f"down: {err}"
                self._fail(str(err))
            else:
                self.state = "connected"

        def refused():
            self.state = "down: the store's worker is busy with a call that does not return"

        budget = self.config.setup_retries * 10.0 + self.config.timeout_s
        self._reads.submit(connect, budget, on_cancel=refused)

    @property
    def connected(self) -> bool:
        if self.state.startswith("down") and time.monotonic() >= self._next_connect and not self._reads.stuck:
            self.state = "connecting"
            self._connect()
        return self.state == "connected"

    def _usable(self, what: str, n: int = 1) -> bool:
        """Whether a call may go to the store now; counts why not."""
        why = None if self.connected else "not_connected"
        if why is None and not self.breaker.allow():
            why = "breaker"
        if why is None and what == "read" and self._reads.stuck:
            why = "busy"
        if why is not None:
            self._count(f"skip:{why}" if what == "read" else f"wskip:{why}", n)
        return why is None

    def _fail(self, why: str) -> None:
        """The store as a whole failed: skip it for ``retry_after_s``, and say so (once)."""
        self.breaker.failure(why)
        self._warn(
            "remote:unavailable",
            f"prefix pool: the remote store (master {self.config.master}) did not answer "
            f"({why}): serving from the local tiers and recomputing, the store skipped for "
            f"{self.config.retry_after_s:g} s at a time (stats().remote counts the misses)",
        )

    def _wait(self, call):
        """``Worker.wait`` on the read worker, its time added to what requests spent waiting."""
        t0 = time.monotonic()
        try:
            return self._reads.wait(call)
        finally:
            dt = time.monotonic() - t0
            with self._lock:
                self._wait_s += dt
                self._wait_max_s = max(self._wait_max_s, dt)

    def _budget(self, nbytes: int) -> float:
        return self.config.timeout_s + nbytes / (self.config.floor_gbps * 1e9)

    def _call(self, fn, nbytes: int):
        """``fn()`` on the read worker under its deadline; None (and the breaker told) on failure."""
        try:
            return self._wait(self._reads.submit(fn, self._budget(nbytes)))
        except (Timeout, StoreDown) as err:
            self._fail(str(err))
            self._count("fail:timeout" if isinstance(err, Timeout) else "fail:down")
        except Refused:
            self._count("skip:busy")
        return None

    # -- names, states --------------------------------------------------------------------

    def name(self, key: bytes, layer: int) -> str:
        return f"{self.config.key_prefix}{key.hex()}/{layer}"

    def _marker(self, key: bytes) -> str:
        return f"{self.config.key_prefix}{key.hex()}/seen"

    def _set_state(self, key: bytes, state: str | None) -> None:
        with self._lock:
            if state is None:
                self._states.pop(key, None)
                return
            self._states[key] = state
            self._states.move_to_end(key)
            while len(self._states) > self.config.known_keys:
                self._states.popitem(last=False)

    def _count(self, what: str, n: int = 1) -> None:
        if not n:
            return
        with self._lock:
            self._counts[what] += n

    # -- lookup and load ------------------------------------------------------------------

    def present(self, keys: list[bytes]) -> dict[bytes, str]:
        """For each key asked: "present" (loadable), "seen" (a node saw it, none stored it) or
        "absent". One store call; nothing (all absent) while the store is unusable."""
        if not keys or not self._usable("read"):
            return {}
        names = [self.name(k, self.num_layers - 1) for k in keys] + [self._marker(k) for k in keys]
        found = self._call(lambda: self.store.exists(names), 0)
        if found is None:
            return {}
        self._count("lookups")
        with self._lock:
            bad = {k for k in keys if self._states.get(k) == "bad"}
        out = {}
        for k, there, seen in zip(keys, found[: len(keys)], found[len(keys) :]):
            out[k] = "present" if there and k not in bad else "seen" if seen or there else "absent"
            if out[k] != "absent" and k not in bad:
                self._set_state(k, out[k])
        self._count("chunks_present", sum(v == "present" for v in out.values()))
        return out

    def open_read(self, keys: list[bytes], ring: int) -> RemoteRead | None:
        """A read of ``keys``' layers into a staging ring of ``ring`` layers; None if unusable now."""
        if not self._usable("read"):
            return None
        rows = 1 << (len(keys) - 1).bit_length()  # powers of two: a longer prompt rarely registers anew
        if not self._read_bufs or self._read_bufs[0].shape[0] < len(keys) or len(self._read_bufs) != ring:
            old, new = (
                self._read_bufs,
                [
                    aligned_empty(rows * self.row_bytes, torch.device("cpu"), pin=True).view(rows, self.row_bytes)
                    for _ in range(ring)
                ],
            )

            def swap():
                for b in old:
                    self.store.unregister(b.data_ptr())
                for b in new:
                    self.store.register(b.data_ptr(), b.numel())
                return True

            if self._call(swap, 0) is None:
                self._read_bufs = []  # registrations unknown: start over next time
                return None
            self._read_bufs = new
        return RemoteRead(self, keys, self._read_bufs)

    def loaded(self, n: int) -> None:
        self._count("hits", n)
        self._count("hit_bytes", n * self.num_layers * self.layout.stored_bytes)

    def forget(self, keys: list[bytes], reason: str) -> None:
        """Chunks of the store not served (``reason``; the first is the one that failed): counted.
        A chunk that failed by itself is not looked up again, and its next write replaces
        every layer (a bad or partly evicted copy would stay otherwise)."""
        self._count(f"miss:{reason}", len(keys))
        if keys and reason in PER_CHUNK:
            self._set_state(keys[0], "bad")

    # -- admission and write-behind ---------------------------------------------------------

    def admit(self, keys: list[bytes]) -> list[int]:
        """Indices of ``keys`` to write now: not known present, and sighted ``admit_after`` times
        (this node's stores plus a marker of another node's). The others leave a marker."""
        out, mark = [], []
        for i, k in enumerate(keys):
            with self._lock:
                state = self._states.get(k)
                n = self._sightings.pop(k, 0) + 1
                self._sightings[k] = n
                while len(self._sightings) > self.config.known_keys:
                    self._sightings.popitem(last=False)
            if state == "present":
                continue
            if state in ("seen", "bad") or n >= self.config.admit_after:
                out.append(i)
            elif n == 1:
                mark.append(k)
        if mark and self._usable("write", 0):
            names = [self._marker(k) for k in mark]
            self._writes.submit(lambda: self._mark(names), self._budget(0))
        return out

    def _mark(self, names: list[str]) -> None:
        try:
            self.store.mark(names)
            self._count("marks", len(names))
        except StoreDown as err:
            self._fail(str(err))

    def begin_write(self, keys: list[bytes]) -> WriteJob | None:
        """Room in the write ring for as many of ``keys`` (in order) as fit; None if none does."""
        if not keys or not self._usable("write", len(keys)):
            return None
        n = min(len(keys), self._ring.largest() // self.num_layers)
        if n < len(keys):
            self._count("wskip:buffer_full", len(keys) - n)
        start = self._ring.alloc(n * self.num_layers) if n else None
        if start is None:
            return None
        rows = self._ring_rows[start : start + n * self.num_layers].view(self.num_layers, n, self.row_bytes)
        return WriteJob(list(keys[:n]), start, rows)

    def submit(self, job: WriteJob) -> None:
        """Send ``job`` behind (its rows are filled and synchronized)."""
        nbytes = len(job.keys) * self.num_layers * self.value_bytes
        self._writes.submit(
            lambda: write(self, job), self._budget(nbytes), on_cancel=lambda: self.cancel(job, "cancelled")
        )

    def cancel(self, job: WriteJob, why: str = "error") -> None:
        """Give back the rows of a job that will not be submitted."""
        self._count(f"wskip:{why}", len(job.keys))
        self._ring.free(job.start)

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the chunks on their way to the store; True when none is left."""
        return self._writes.idle(timeout)

    # -- state ------------------------------------------------------------------------------

    def stats(self) -> RemoteStats:
        with self._lock:
            c = dict(self._counts)

        def by(prefix: str) -> dict:
            return {k.removeprefix(prefix): v for k, v in sorted(c.items()) if k.startswith(prefix)}

        return RemoteStats(
            state=self.state,
            breaker=self.breaker.state,
            breaker_opens=self.breaker.opens,
            lookups=c.get("lookups", 0),
            chunks_present=c.get("chunks_present", 0),
            hits=c.get("hits", 0),
            hit_bytes=c.get("hit_bytes", 0),
            misses=by("miss:"),
            failures=by("fail:"),
            skipped=by("skip:"),
            written=c.get("written", 0),
            written_bytes=c.get("written_bytes", 0),
            write_skipped=by("wskip:"),
            marks=c.get("marks", 0),
            wait_s=self._wait_s,
            wait_max_s=self._wait_max_s,
        )

    def close(self) -> None:
        """Send what is queued (up to ``flush_s``), then leave the store; a store that does not
        answer is left behind on a daemon thread, never waited for past ``timeout_s``."""
        if self.state == "closed":
            return
        self._writes.close(self.config.flush_s if self.breaker.allow() else 0.0)
        self._reads.close(0.0)
        done = threading.Event()

        def leave():
            try:
                self.store.close()
            finally:
                done.set()

        threading.Thread(target=leave, name="kvdrive-remote-close", daemon=True).start()
        done.wait(self.config.timeout_s)
        self.state = "closed"
