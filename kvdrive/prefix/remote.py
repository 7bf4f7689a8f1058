"""The prefix pool's remote tier: chunks shared by every serving node through one store.

Objects: one per (chunk, layer), named ``<key_prefix><key hex>/<layer>``: the layer's KV,
``(2, H_kv, C, D)`` as ``stored_bytes``, then a 64-byte trailer that binds it to its place
(magic, key, layer, layer count, payload bytes, format, a digest of the layout name, and
the payload's xxh3_64 bound to (key, layer) by ``keys.bind_sums``). A read is served only
if every field is what the reader asked for; anything else is a miss. The chunk key
already names the weights digest, dtype, layout, chunk size and tenant, so nodes share
exactly the chunks whose KV is interchangeable, and tenants never meet.

Store (behind): admitted chunks' KV is copied into a registered ring (the only work on the
request path); the write worker checks which are already present, seals the rest and
sends layers 0..L-2, then the last layer of each chunk whose other layers all landed: a
last layer present means its chunk was written whole. Admission: the ``admit_after``-th
sighting of a chunk, counting this node's and the ``<key>/seen`` markers every node
leaves, so a prefix seen once on each of two nodes is shared on the second.

Load: ``present`` asks in one call which chunks exist (their last layer) and were seen;
``RemoteRead`` fetches layer l of every remote chunk in one batch into a registered
staging ring, ahead of the import like the disks' reads, and checks each on the worker.

Failure: every call runs on a worker thread under a deadline (``remote_io``); a timeout or
an unreachable master opens the breaker and the store is skipped for ``retry_after_s``.
A miss, a timeout or a bad value is a recompute, counted in ``stats()``: a request waits
at most one call's deadline for the store, and bad KV is never served.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash

from kvdrive.errors import KvdriveError
from kvdrive.prefix.config import RemoteConfig
from kvdrive.prefix.keys import bind_sum
from kvdrive.prefix.remote_io import Breaker, Refused, Timeout, Worker
from kvdrive.prefix.remote_store import RemoteStore, StoreDown, open_store
from kvdrive.storage.io_buffers import Ring, aligned_empty
from kvdrive.storage.layout import GroupLayout, align_up

log = logging.getLogger(__name__)

TRAILER = struct.Struct("<8s16sIIIIQQ")  # magic, key, layer, layers, payload bytes, format, layout digest, bound xxh3
TRAILER_BYTES = 64
MAGIC = b"kvdrvKV\x01"
FORMAT = 1
ROW_ALIGN = 64
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


class WriteJob:
    """Chunks on their way to the store: ``layer(l)`` is (n, row_bytes) uint8 whose first
    ``stored_bytes`` of row j the caller fills with chunk j's layer l before ``submit``."""

    def __init__(self, keys: list[bytes], start: int, rows: torch.Tensor):
        self.keys, self.start = keys, start
        self.rows = rows  # (L, n, row_bytes) uint8, a view into the registered ring

    def layer(self, layer: int) -> torch.Tensor:
        return self.rows[layer]


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
        self._layout_digest = int.from_bytes(hashlib.blake2b(layout.name.encode(), digest_size=8).digest(), "little")
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

    def _read_layer(self, keys: list[bytes], layer: int, buf: torch.Tensor) -> list[str | None]:
        """On the read worker: layer ``layer`` of ``keys`` into ``buf``'s rows, each checked."""
        rows = buf.numpy()
        base = buf.data_ptr()
        out = self.store.get_into(
            [self.name(k, layer) for k in keys], [base + j * self.row_bytes for j in range(len(keys))], self.value_bytes
        )
        return [why if why is not None else self._check(rows[j], k, layer) for j, (k, why) in enumerate(zip(keys, out))]

    def _seal(self, row: np.ndarray, key: bytes, layer: int) -> None:
        gb = self.layout.stored_bytes
        digest = bind_sum(key, layer, xxhash.xxh3_64_intdigest(row[:gb]))
        row[gb : gb + TRAILER.size] = np.frombuffer(
            TRAILER.pack(MAGIC, key, layer, self.num_layers, gb, FORMAT, self._layout_digest, digest), dtype=np.uint8
        )

    def _check(self, row: np.ndarray, key: bytes, layer: int) -> str | None:
        gb = self.layout.stored_bytes
        got = TRAILER.unpack(row[gb : gb + TRAILER.size].tobytes())
        want = (MAGIC, key, layer, self.num_layers, gb, FORMAT, self._layout_digest)
        if got[:7] != want:
            return "corrupt"
        digest = bind_sum(key, layer, xxhash.xxh3_64_intdigest(row[:gb]))
        return None if digest == got[7] else "corrupt"

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
            lambda: self._write(job), self._budget(nbytes), on_cancel=lambda: self.cancel(job, "cancelled")
        )

    def cancel(self, job: WriteJob, why: str = "error") -> None:
        """Give back the rows of a job that will not be submitted."""
        self._count(f"wskip:{why}", len(job.keys))
        self._ring.free(job.start)

    def _write(self, job: WriteJob) -> None:
        """On the write worker: send the chunks of ``job`` not already present, then free its rows."""
        t0 = time.monotonic()
        keys, L = job.keys, self.num_layers
        try:
            if not self.breaker.allow():
                self._count("wskip:breaker", len(keys))
                return
            with self._lock:
                replace = [self._states.get(k) == "bad" for k in keys]
            there = self.store.exists([self.name(k, L - 1) for k in keys])
            todo = [j for j, k in enumerate(keys) if replace[j] or not there[j]]
            for j, k in enumerate(keys):
                if j not in todo:
                    self._set_state(k, "present")
            self._count("wskip:present", len(keys) - len(todo))
            if not todo:
                return
            rows = job.rows.numpy()  # (L, n, row_bytes)
            for layer in range(L):
                for j in todo:
                    self._seal(rows[layer, j], keys[j], layer)
            base, stride = job.rows.data_ptr(), self.row_bytes
            ptr = lambda layer, j: base + (layer * len(keys) + j) * stride  # noqa: E731
            # one store call per layer: a call's bytes stay bounded by one layer of the job (a 32K prompt's every layer
            # is 4 GiB), and a chunk that failed a layer is not sent further
            res: list = []
            whole = list(todo)
            for layer in range(L - 1):
                got = (
                    self.store.put_from(
                        [self.name(keys[j], layer) for j in whole],
                        [ptr(layer, j) for j in whole],
                        self.value_bytes,
                        any(replace),
                    )
                    if whole
                    else []
                )
                res += got
                whole = [j for j, why in zip(whole, got) if why is None]
            last = (
                self.store.put_from(
                    [self.name(keys[j], L - 1) for j in whole],
                    [ptr(L - 1, j) for j in whole],
                    self.value_bytes,
                    any(replace),
                )
                if whole
                else []
            )
            done = [j for j, why in zip(whole, last) if why is None]
            for j in done:
                self._set_state(keys[j], "present")
            self._count("written", len(done))
            self._count("written_bytes", len(done) * L * self.value_bytes)
            why = next((w for w in [*res, *last] if w is not None), "error")
            if len(done) < len(todo):
                self._count(f"wskip:{why}", len(todo) - len(done))
            if time.monotonic() - t0 > self._budget(len(todo) * L * self.value_bytes):
                self._fail("a write ran past its deadline")
        except StoreDown as err:
            self._fail(str(err))
            self._count("wskip:down", len(keys))
        except Exception as err:  # noqa: BLE001 - a write behind never reaches a request; counted and logged
            log.warning("a write to the remote store failed: %r", err, exc_info=True)
            self._count(f"wskip:error {type(err).__name__}", len(keys))
        finally:
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


class RemoteRead:
    """One load's reads from the store: ``issue(l)`` starts layer l of every chunk (on the read
    worker, into ring buffer l % ring); ``result(l)`` waits within its deadline and gives a
    miss reason or None per chunk; ``rows(l)`` is then (n, row_bytes) uint8, each row a value
    (``stored_bytes`` of KV, then its trailer), valid until layer l + ring is issued."""

    def __init__(self, tier: RemoteTier, keys: list[bytes], bufs: list[torch.Tensor]):
        self.tier, self.keys, self.bufs = tier, keys, bufs
        self._calls: dict = {}

    def issue(self, layer: int) -> None:
        t, buf = self.tier, self.bufs[layer % len(self.bufs)]
        self._calls[layer] = t._reads.submit(
            lambda: t._read_layer(self.keys, layer, buf), t._budget(len(self.keys) * t.value_bytes)
        )

    def result(self, layer: int) -> list[str | None]:
        n, t = len(self.keys), self.tier
        try:
            return t._wait(self._calls.pop(layer))
        except Timeout as err:
            t._fail(str(err))
            why = "timeout"
        except StoreDown as err:
            t._fail(str(err))
            why = "down"
        except Refused:
            why = "busy"
        t._count(f"fail:{why}")
        return [why] * n

    def rows(self, layer: int) -> torch.Tensor:
        return self.bufs[layer % len(self.bufs)][: len(self.keys)]

    def drain(self) -> None:
        """Wait for (or give up on, within their deadlines) the layers still issued."""
        for layer in list(self._calls):
            self.result(layer)
