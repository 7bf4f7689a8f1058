"""Moving prefix chunks: the layer-pipelined parallel load, and the store's export + write.

A chunk is ``C`` tokens of every layer; on disk and in host memory one slot holds one
layer of one chunk, laid out like a KV group of ``G = C`` tokens: (2, H_kv, C, D), in the
pool's storage format (``PrefixConfig.kv_dtype``: quantized by the store, dequantized on
the device layer by layer by the load). For Llama-3.1-8B in bf16 at C = 256 that is 1 MiB,
one O_DIRECT read (fp8: 520 KiB, int4: 268 KiB).

Load (``import_chunks``): the KV of ``n`` chunks enters the cache through the normal
path, one ``plan([seq], n*C)``, one ``append`` per layer, one ``commit``. Reads run
``ahead`` layers in front of the import: layer ``l``'s slots of every chunk are issued
on all devices at once (each device's share one native batch outside the GIL on its own
threads, so every disk is busy together), into a ring of ``ahead`` pinned staging buffers; while layer ``l`` is copied
to the GPU and appended, layers ``l+1 .. l+ahead-1`` are being read. Host-resident
chunks are copied straight from the pinned host arena by one gather launch per layer. Chunks of the remote tier
are read like the disks', layer by layer ahead of the import, by a ``RemoteRead`` (remote_objects.py) that checks each
value on its worker thread and gives up at its deadline. Every disk slot is checked against
the xxh3_64 in its chunk's own index row; the first chunk that fails at any layer ends the import uncommitted and
is reported, so the caller can drop it and import the shorter prefix again. An
uncommitted plan is simply abandoned (plans of the plain and sparse caches do not
mutate the cache; only ``commit`` does).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import torch

from kvdrive import device as devices
from kvdrive.quant.dequant import dequant_rows
from kvdrive.storage.gather import RowCopier
from kvdrive.storage.host import HostTier
from kvdrive.storage.io_buffers import aligned_empty
from kvdrive.storage.io_engine import BatchFuture
from kvdrive.storage.layout import GroupLayout
from kvdrive.storage.pool import DiskPool


class ChunkSource(NamedTuple):
    """Where one chunk is read from: the host arena or a disk of the pool, one slot per layer,
    and (disk) the xxh3_64 each slot's data must have, from the chunk's own index row; or the
    remote tier, by key."""

    tier: str  # "host" | "disk" | "remote"
    device: int  # index into the pool's devices (disk); -1 for host and remote
    slots: list[int]
    sums: list[int] | None = None
    key: bytes | None = None  # remote: the chunk's key


class ImportResult(NamedTuple):
    chunks: int  # chunks imported and committed (== asked) or, on failure, the first bad chunk
    failed: bool
    reason: str | None  # miss reason of the first bad slot ("checksum", "io_error", ...)
    bytes_disk: int
    bytes_host: int
    seconds: float
    bytes_remote: int = 0


class Staging:
    """A ring of page-aligned (pinned on CUDA machines) buffers for one layer's disk reads
    each; grows on demand and is kept, so steady-state loads allocate nothing."""

    def __init__(self, layout: GroupLayout, ring: int):
        self.layout, self.ring = layout, ring
        self.rows_per_buf = 0
        self._bufs: list[torch.Tensor] = []

    def reserve(self, rows: int) -> None:
        if rows <= self.rows_per_buf:
            return
        sb = self.layout.slot_bytes
        self._bufs = [aligned_empty(rows * sb, torch.device("cpu"), pin=True).view(rows, sb) for _ in range(self.ring)]
        self.rows_per_buf = rows

    def buf(self, i: int) -> torch.Tensor:
        return self._bufs[i % self.ring]  # (rows, slot_bytes) uint8

    @property
    def nbytes(self) -> int:
        return self.ring * self.rows_per_buf * self.layout.slot_bytes


def import_chunks(
    cache,
    seq_id: int,
    sources: list[ChunkSource],
    layout: GroupLayout,
    pool: DiskPool | None,
    host: HostTier | None,
    staging: Staging,
    device: torch.device,
    remote=None,
) -> ImportResult:
    """``remote``: the ``RemoteRead`` of the sources of tier "remote", in their order."""
    t0 = time.perf_counter()
    n, c, gb = len(sources), layout.group_tokens, layout.stored_bytes
    disk_idx = [i for i, s in enumerate(sources) if s.tier == "disk"]
    host_idx = [i for i, s in enumerate(sources) if s.tier == "host"]
    remote_idx = [i for i, s in enumerate(sources) if s.tier == "remote"]
    staging.reserve(len(disk_idx))
    batch = cache.plan([seq_id], n * c)
    done = devices.new_event(device)
    futures: dict[int, BatchFuture] = {}

    def issue(layer: int) -> None:
        if remote_idx:
            remote.issue(layer)
        if not disk_idx:
            futures[layer] = BatchFuture(0, [])
            return
        base = staging.buf(layer).data_ptr()
        parts, by_dev = [], {}
        for row, i in enumerate(disk_idx):
            by_dev.setdefault(sources[i].device, []).append(row)
        for dev, rows in by_dev.items():
            slots = np.array([sources[disk_idx[r]].slots[layer] for r in rows], dtype=np.int64)
            sums = np.array([sources[disk_idx[r]].sums[layer] for r in rows], dtype=np.uint64)
            dsts = base + np.asarray(rows, dtype=np.uint64) * np.uint64(layout.slot_bytes)  # row r of the buffer
            parts.append((rows, pool.devices[dev].read_to(slots, dsts, sums)))  # one native batch per disk
        futures[layer] = BatchFuture(len(disk_idx), parts)

    def drain() -> None:
        for f in futures.values():
            f.result()
        if remote_idx:
            remote.drain()

    ahead = staging.ring
    for layer in range(min(ahead - 1, layout.num_layers)):  # the ring slot of the layer in import stays busy
        issue(layer)
    host_rows = torch.tensor(
        [[s.slots[l] for l in range(layout.num_layers)] for s in (sources[i] for i in host_idx)], dtype=torch.int64
    ).reshape(len(host_idx), layout.num_layers)
    copier = RowCopier(device)
    disk_at = torch.tensor(disk_idx, dtype=torch.int64, device=device)
    remote_at = torch.tensor(remote_idx, dtype=torch.int64, device=device)
    for layer in range(layout.num_layers):
        if layer + ahead - 1 < layout.num_layers:
            issue(layer + ahead - 1)
        why_of = dict(zip(disk_idx, futures.pop(layer).result()))
        if remote_idx:
            why_of.update(zip(remote_idx, remote.result(layer)))
        bad = [i for i, why in why_of.items() if why is not None]
        if bad:
            drain()
            first = min(bad)
            return ImportResult(first, True, why_of[first], 0, 0, time.perf_counter() - t0)
        rows = staging.buf(layer)[: len(disk_idx), :gb] if disk_idx else None
        if not host_idx and not remote_idx:
            flat = rows.to(device, non_blocking=True)  # (n, stored_bytes) uint8
        else:
            flat = torch.empty(n, gb, dtype=torch.uint8, device=device)
            if host_idx:
                # Pinned arena -> GPU in one launch (Triton over unified addressing), no CPU gather.
                copier.copy(
                    host.rows.view(torch.int32),
                    host_rows[:, layer].tolist(),
                    flat.view(torch.int32),
                    host_idx,
                    layout.stored_words,
                )
            if disk_idx:
                flat[disk_at] = rows.to(device, non_blocking=True)
            if remote_idx:
                # whole rows (value + trailer): one contiguous copy from pinned memory, cut on the device
                flat[remote_at] = remote.rows(layer).to(device, non_blocking=True)[:, :gb]
        kv = _widen(flat, layout, device)  # (n, 2, H_kv, C, D)
        k = kv[:, 0].transpose(0, 1).reshape(1, layout.num_kv_heads, n * c, layout.head_dim)  # (1, H_kv, P, D)
        v = kv[:, 1].transpose(0, 1).reshape(1, layout.num_kv_heads, n * c, layout.head_dim)
        cache.append(layer, k, v, batch)
        done.record()
        done.synchronize()  # the staging buffer of this layer is free again
    cache.commit(batch)
    nbytes = layout.num_layers * gb
    return ImportResult(
        n,
        False,
        None,
        nbytes * len(disk_idx),
        nbytes * len(host_idx),
        time.perf_counter() - t0,
        nbytes * len(remote_idx),
    )


def _widen(flat: torch.Tensor, layout: GroupLayout, device: torch.device) -> torch.Tensor:
    """Stored rows (n, stored_bytes) uint8 on ``device`` -> typed groups (n, 2, H_kv, C, D): a
    view when uncompressed, else one dequantizing launch on the device."""
    if not layout.compressed:
        return layout.as_groups(flat)
    n = flat.shape[0]
    kv = torch.empty((n, *layout.slot_shape), dtype=layout.dtype, device=device)
    at = torch.arange(n, device=device)
    dequant_rows(flat, at, kv.view(n, -1), at, layout.kv_dtype, layout.group_shape)
    return kv


def export_layer(cache, seq_id: int, layer: int, chunks: list[int], layout: GroupLayout) -> torch.Tensor:
    """Chunks ``chunks`` (ascending indices) of one layer as contiguous (N, 2, H_kv, C, D),
    on the cache's device."""
    c = layout.group_tokens
    lo, hi = chunks[0], chunks[-1] + 1
    k, v = cache.export_kv(seq_id, layer, lo * c, hi * c)  # (H_kv, (hi-lo)*C, D)
    h, d = layout.num_kv_heads, layout.head_dim
    kv = torch.stack([k.view(h, hi - lo, c, d), v.view(h, hi - lo, c, d)], dim=1)  # (H_kv, 2, n, C, D)
    kv = kv.permute(2, 1, 0, 3, 4)  # (n, 2, H_kv, C, D)
    if len(chunks) != hi - lo:
        kv = kv[torch.tensor([i - lo for i in chunks], device=kv.device)]
    return kv.contiguous()
