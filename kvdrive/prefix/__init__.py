"""The prefix pool: KV of repeated prompt prefixes, reused across requests and restarts.

* ``pool``: ``PrefixPool`` and ``PrefixConfig``, lookup / load / store, admission, eviction;
* ``keys``: content addresses of token chunks (chained SHA-256 in a namespace);
* ``index``: the crash-safe SQLite index of which chunk lives in which disk slots;
* ``load``: the layer-pipelined parallel load into a cache; ``store``: export and write.
"""

from kvdrive.prefix.pool import PrefixConfig, PrefixPool

__all__ = ["PrefixConfig", "PrefixPool"]
