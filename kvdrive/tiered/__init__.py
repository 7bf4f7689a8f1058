"""The tiered sparse cache: every KV group in host memory (and on disk), a GPU selection
cache per layer, decode attending sparsely over what the selection keeps resident.

* ``cache``: ``TieredSparseKVCache``, the ``KVCache`` (a package, a module per phase: the
  initial placement, a layer's selection and fetch, sealing, ...); ``config``:
  ``TieredConfig``; ``admission``: how many sequences fit and what one costs on the GPU;
* ``prefill``: the prefill phase (groups to the host tier, exact dense attention, the
  prompts' last queries for the initial placement);
* ``selection_cache``: ``SelectionCache``, one layer's GPU cache of selected groups (its
  bookkeeping kernel: ``selection_cache_triton``);
* ``tier_ops``: the token writes into the tiers (kernels: ``tier_ops_triton``);
* ``window_ring``: sliding-window layers' last tokens on the GPU; ``step_profile``: where an
  eager step's time goes;
* ``host_kv``: the ``HostKV`` interface and ``FullHostKV`` (all of it pinned);
  ``disk_host_kv``: ``DiskBackedHostKV``, a pinned arena in front of the disk pool, whose slot
  bookkeeping is ``arena_index.ArenaIndex`` (no torch) and whose deferred-miss reads are
  ``deferred.DeferredReads``.
"""

from kvdrive.tiered.cache import TieredSparseKVCache
from kvdrive.tiered.config import TieredConfig
from kvdrive.tiered.disk_host_kv import DiskBackedHostKV
from kvdrive.tiered.host_kv import FullHostKV, HostKV
from kvdrive.tiered.selection_cache import SelectionCache
from kvdrive.tiered.step_profile import StepProfile

__all__ = [
    "DiskBackedHostKV",
    "FullHostKV",
    "HostKV",
    "SelectionCache",
    "StepProfile",
    "TieredConfig",
    "TieredSparseKVCache",
]
