"""KV caches: the ``KVCache`` contract and the caches that keep all KV on one device."""
