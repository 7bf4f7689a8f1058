"""The prefix pool: KV of repeated prompt prefixes, reused across requests, restarts and servers.

* ``pool``: ``PrefixPool``, lookup / load / store, hit accounting, failures it lives with;
* ``placement``: where chunks live: admission, placement over host and disks, eviction;
* ``config``: ``PrefixConfig`` and ``RemoteConfig`` (the store shared by every serving node);
* ``keys``: content addresses of token chunks (chained SHA-256 in a namespace);
* ``index``: the crash-safe SQLite index of which chunk lives in which disk slots;
* ``load``: the layer-pipelined parallel load into a cache; ``store``: export and write;
* ``remote``: the remote tier (Mooncake Store), through ``remote_objects`` (the objects'
  trailer, the workers' reads and writes), ``remote_store`` (the store's contract and
  client) and ``remote_io`` (calls under deadlines, a circuit breaker).
"""

from kvdrive.prefix.config import PrefixConfig, RemoteConfig
from kvdrive.prefix.pool import PrefixPool

__all__ = ["PrefixConfig", "PrefixPool", "RemoteConfig"]
