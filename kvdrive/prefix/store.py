"""Writing prefix chunks: export from the cache layer by layer, copy to host, write to disk.

``ChunkWriter.write`` exports one layer of all chunks to store at a time
(``cache.export_kv``), copies host-bound chunks into their arena slots and disk-bound
ones into a ring of ``ring`` staging buffers, and issues each disk's share of the layer
on that disk's write queue. A staging buffer is reused only after the writes that read
it completed, so layer ``l+1`` is exported while layers ``l, l-1, ...`` are written.
Chunks bound for the remote tier are copied, layer by layer, into the rows of a
``WriteJob`` (registered memory the remote tier sends behind). It returns when every
write has completed (the caller then ``fdatasync``s and commits the index rows: data
first, index second) and the remote rows are filled.
"""

from __future__ import annotations

import torch

from kvdrive import device as devices
from kvdrive.prefix.index import DiskChunk
from kvdrive.prefix.keys import bind_sums
from kvdrive.prefix.load import Staging, export_layer
from kvdrive.quant.formats import quantize
from kvdrive.storage.disk import DiskDevice
from kvdrive.storage.gather import RowCopier
from kvdrive.storage.host import HostTier
from kvdrive.storage.io_engine import BatchFuture
from kvdrive.storage.layout import GroupLayout
from kvdrive.storage.pool import DiskPool


def weighted_pick(credit: list[float], weights: list[float], live: list[int]) -> int:
    """Smooth weighted round-robin: over many calls member ``i`` is picked in proportion to
    ``weights[i]``, evenly interleaved. ``credit`` (one float per member) is updated in place."""
    total = sum(weights[i] for i in live)
    for i in live:
        credit[i] += weights[i]
    pick = max(live, key=credit.__getitem__)
    credit[pick] -= total
    return pick


class ChunkWriter:
    def __init__(self, layout: GroupLayout, ring: int):
        self.layout = layout
        self.staging = Staging(layout, ring)

    def write(
        self,
        cache,
        seq_id: int,
        pool: DiskPool | None,
        host: HostTier | None,
        host_slots: dict[int, list[int]],
        disk: dict[int, tuple[int, list[int]]],
        remote: list[int] = (),
        job=None,
    ) -> dict[int, bool]:
        """Store chunk ``i`` into ``host_slots[i]`` (one host slot per layer) and/or
        ``disk[i] = (device, slots)``, and chunk ``remote[j]`` into row j of each layer of
        ``job`` (a remote ``WriteJob``). Returns per disk chunk whether all its writes succeeded."""
        chunks = sorted(set(host_slots) | set(disk) | set(remote))
        pos = {c: j for j, c in enumerate(chunks)}
        gb = self.layout.stored_bytes
        remote_at = torch.tensor([pos[i] for i in remote], dtype=torch.int64)
        disk_order = sorted(disk)
        self.staging.reserve(len(disk_order))
        host_at = [pos[i] for i in host_slots]
        copier = None
        disk_at = torch.tensor([pos[i] for i in disk_order], dtype=torch.int64)
        by_dev: dict[int, list[int]] = {}
        for row, i in enumerate(disk_order):
            by_dev.setdefault(disk[i][0], []).append(row)
        pending: dict[int, BatchFuture] = {}
        results: dict[int, list] = {}
        ring = self.staging.ring
        for layer in range(self.layout.num_layers):
            data = export_layer(cache, seq_id, layer, chunks, self.layout)  # (N, 2, H_kv, C, D)
            flat = quantize(data, self.layout.kv_dtype)  # (N, stored_bytes) uint8, on the cache's device
            if len(remote):
                src = flat if len(remote) == len(chunks) else flat[remote_at.to(flat.device)]
                job.layer(layer)[:, :gb].copy_(src, non_blocking=True)
            if host_slots:
                copier = copier or RowCopier(flat.device)
                copier.copy(
                    flat.view(torch.int32),
                    host_at,
                    host.rows.view(torch.int32),
                    [s[layer] for s in host_slots.values()],
                    self.layout.stored_words,
                )
            if not disk_order:
                continue
            if layer - ring in pending:
                results[layer - ring] = pending.pop(layer - ring).result()
            buf = self.staging.buf(layer)
            buf[: len(disk_order), :gb].copy_(flat[disk_at.to(flat.device)])
            np_rows = buf.numpy()
            parts = []
            for dev, rows_ in by_dev.items():
                slots = [disk[disk_order[r]][1][layer] for r in rows_]
                parts.append((rows_, pool.devices[dev].write(slots, [memoryview(np_rows[r]) for r in rows_])))
            pending[layer] = BatchFuture(len(disk_order), parts)
        for layer, fut in pending.items():
            results[layer] = fut.result()
        if copier is not None or len(remote):
            devices.synchronize(cache.device)  # host and remote copies landed before the chunks become visible
        return {i: all(results[layer][row] is None for layer in results) for row, i in enumerate(disk_order)}

    @staticmethod
    def row(key: bytes, device: DiskDevice, slots: list[int], path: str) -> DiskChunk:
        """The index row of a chunk just written: its checksums bound to its key (``bind_sums``)."""
        return DiskChunk(key, path, list(slots), bind_sums(key, device.checksums(slots)))
