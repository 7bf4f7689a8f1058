"""Where KV groups are stored and how they move, below any cache policy.

* ``layout``: ``GroupLayout``, the geometry of a group (the unit of storage and transfer);
* ``host``: ``HostTier``, a pinned, page-aligned slab of group slots; ``io_buffers`` its
  aligned memory and free list;
* ``disk``: ``DiskDevice``, one path's slots and their batched reads and writes, checked by
  an xxh3 per slot; ``extent_files`` the O_DIRECT extent files, their slots and owner;
  ``io_engine`` its syscalls, queues, fault hook and the per-slot results of a batch;
  ``native_io`` batched I/O outside the GIL (``native/batch_io.c``); ``metrics`` its counters;
* ``pool``: ``DiskPool``, several paths striped by measured bandwidth; ``probe`` the O_DIRECT
  check and the stored bandwidth of a path;
* ``gather``: ``copy_rows``, the one row copy between tiers (kernels: ``gather_triton``).
"""

from kvdrive.storage.disk import DiskDevice
from kvdrive.storage.gather import RowCopier, copy_rows, copy_rows_reference, words
from kvdrive.storage.host import HostTier
from kvdrive.storage.io_engine import BatchFuture
from kvdrive.storage.layout import GroupKey, GroupLayout
from kvdrive.storage.metrics import IoMetrics
from kvdrive.storage.pool import DiskAddr, DiskPool, PoolPath

__all__ = [
    "BatchFuture",
    "DiskAddr",
    "DiskDevice",
    "DiskPool",
    "GroupKey",
    "GroupLayout",
    "HostTier",
    "IoMetrics",
    "PoolPath",
    "RowCopier",
    "copy_rows",
    "copy_rows_reference",
    "words",
]
