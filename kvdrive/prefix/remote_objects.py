"""The remote tier's objects and the worker-thread calls that move them.

An object is one layer of one chunk: ``stored_bytes`` of KV, then a ``TRAILER_BYTES``
trailer (``seal`` writes it, ``check`` reads it) that binds the value to its key, layer,
layer count, payload size, format and layout; a value whose every field is not what the
reader asked for is a miss ("corrupt"), never served. Rows in registered memory are
``align_up(value_bytes, ROW_ALIGN)`` bytes apart.

``read_layer`` and ``write`` run on the tier's read and write workers, never on the request
path; ``RemoteRead`` is the request path's handle on one load's reads. ``write`` sends
layers 0..L-2 of a job's chunks, then the last layer of each chunk whose other layers all
landed, so a last layer present means its chunk was written whole; it always gives the
job's rows back to the ring. ``tier`` is the ``RemoteTier`` (remote.py) that owns the store,
the workers, the breaker and the counters.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time

import numpy as np
import torch
import xxhash

from kvdrive.prefix.keys import bind_sum
from kvdrive.prefix.remote_io import Refused, Timeout
from kvdrive.prefix.remote_store import StoreDown
from kvdrive.storage.layout import GroupLayout

log = logging.getLogger("kvdrive.prefix.remote")  # the tier's logger: one place to watch for the tier's failures

TRAILER = struct.Struct("<8s16sIIIIQQ")  # magic, key, layer, layers, payload bytes, format, layout digest, bound xxh3
TRAILER_BYTES = 64
MAGIC = b"kvdrvKV\x01"
FORMAT = 1
ROW_ALIGN = 64


def layout_digest(layout: GroupLayout) -> int:
    """The layout's name as the 64-bit digest a trailer carries."""
    return int.from_bytes(hashlib.blake2b(layout.name.encode(), digest_size=8).digest(), "little")


def seal(row: np.ndarray, key: bytes, layer: int, layout: GroupLayout, digest: int) -> None:
    """Write the trailer of ``row`` (its first ``stored_bytes`` are the KV of ``key``'s ``layer``)."""
    gb = layout.stored_bytes
    bound = bind_sum(key, layer, xxhash.xxh3_64_intdigest(row[:gb]))
    row[gb : gb + TRAILER.size] = np.frombuffer(
        TRAILER.pack(MAGIC, key, layer, layout.num_layers, gb, FORMAT, digest, bound), dtype=np.uint8
    )


def check(row: np.ndarray, key: bytes, layer: int, layout: GroupLayout, digest: int) -> str | None:
    """None if ``row`` is the sealed value of ``key``'s ``layer`` in this layout, else "corrupt"."""
    gb = layout.stored_bytes
    got = TRAILER.unpack(row[gb : gb + TRAILER.size].tobytes())
    want = (MAGIC, key, layer, layout.num_layers, gb, FORMAT, digest)
    if got[:7] != want:
        return "corrupt"
    bound = bind_sum(key, layer, xxhash.xxh3_64_intdigest(row[:gb]))
    return None if bound == got[7] else "corrupt"


class WriteJob:
    """Chunks on their way to the store: ``layer(l)`` is (n, row_bytes) uint8 whose first
    ``stored_bytes`` of row j the caller fills with chunk j's layer l before ``submit``."""

    def __init__(self, keys: list[bytes], start: int, rows: torch.Tensor):
        self.keys, self.start = keys, start
        self.rows = rows  # (L, n, row_bytes) uint8, a view into the registered ring

    def layer(self, layer: int) -> torch.Tensor:
        return self.rows[layer]


def read_layer(tier, keys: list[bytes], layer: int, buf: torch.Tensor) -> list[str | None]:
    """On the read worker: layer ``layer`` of ``keys`` into ``buf``'s rows, each checked."""
    rows = buf.numpy()
    base = buf.data_ptr()
    out = tier.store.get_into(
        [tier.name(k, layer) for k in keys], [base + j * tier.row_bytes for j in range(len(keys))], tier.value_bytes
    )
    return [
        why if why is not None else check(rows[j], k, layer, tier.layout, tier._layout_digest)
        for j, (k, why) in enumerate(zip(keys, out))
    ]


def write(tier, job: WriteJob) -> None:
    """On the write worker: send the chunks of ``job`` not already present, then free its rows."""
    t0 = time.monotonic()
    keys, L = job.keys, tier.num_layers
    try:
        if not tier.breaker.allow():
            tier._count("wskip:breaker", len(keys))
            return
        with tier._lock:
            replace = [tier._states.get(k) == "bad" for k in keys]
        there = tier.store.exists([tier.name(k, L - 1) for k in keys])
        todo = [j for j, k in enumerate(keys) if replace[j] or not there[j]]
        for j, k in enumerate(keys):
            if j not in todo:
                tier._set_state(k, "present")
        tier._count("wskip:present", len(keys) - len(todo))
        if not todo:
            return
        rows = job.rows.numpy()  # (L, n, row_bytes)
        for layer in range(L):
            for j in todo:
                seal(rows[layer, j], keys[j], layer, tier.layout, tier._layout_digest)
        base, stride = job.rows.data_ptr(), tier.row_bytes
        ptr = lambda layer, j: base + (layer * len(keys) + j) * stride  # noqa: E731
        # one store call per layer: a call's bytes stay bounded by one layer of the job (a 32K prompt's every layer
        # is 4 GiB), and a chunk that failed a layer is not sent further
        res: list = []
        whole = list(todo)
        for layer in range(L - 1):
            got = (
                tier.store.put_from(
                    [tier.name(keys[j], layer) for j in whole],
                    [ptr(layer, j) for j in whole],
                    tier.value_bytes,
                    any(replace),
                )
                if whole
                else []
            )
            res += got
            whole = [j for j, why in zip(whole, got) if why is None]
        last = (
            tier.store.put_from(
                [tier.name(keys[j], L - 1) for j in whole],
                [ptr(L - 1, j) for j in whole],
                tier.value_bytes,
                any(replace),
            )
            if whole
            else []
        )
        done = [j for j, why in zip(whole, last) if why is None]
        for j in done:
            tier._set_state(keys[j], "present")
        tier._count("written", len(done))
        tier._count("written_bytes", len(done) * L * tier.value_bytes)
        why = next((w for w in [*res, *last] if w is not None), "error")
        if len(done) < len(todo):
            tier._count(f"wskip:{why}", len(todo) - len(done))
        if time.monotonic() - t0 > tier._budget(len(todo) * L * tier.value_bytes):
            tier._fail("a write ran past its deadline")
    except StoreDown as err:
        tier._fail(str(err))
        tier._count("wskip:down", len(keys))
    except Exception as err:  # noqa: BLE001 - a write behind never reaches a request; counted and logged
        log.warning("a write to the remote store failed: %r", err, exc_info=True)
        tier._count(f"wskip:error {type(err).__name__}", len(keys))
    finally:
        tier._ring.free(job.start)


class RemoteRead:
    """One load's reads from the store: ``issue(l)`` starts layer l of every chunk (on the read
    worker, into ring buffer l % ring); ``result(l)`` waits within its deadline and gives a
    miss reason or None per chunk; ``rows(l)`` is then (n, row_bytes) uint8, each row a value
    (``stored_bytes`` of KV, then its trailer), valid until layer l + ring is issued."""

    def __init__(self, tier, keys: list[bytes], bufs: list[torch.Tensor]):
        self.tier, self.keys, self.bufs = tier, keys, bufs
        self._calls: dict = {}

    def issue(self, layer: int) -> None:
        t, buf = self.tier, self.bufs[layer % len(self.bufs)]
        self._calls[layer] = t._reads.submit(
            lambda: read_layer(t, self.keys, layer, buf), t._budget(len(self.keys) * t.value_bytes)
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
