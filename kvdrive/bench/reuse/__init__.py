"""Prefix reuse benchmarks: the time to first token of a stored prefix against recompute.

* ``ttft``: ``kvdrive bench ttft``, recompute vs a serial buffered load vs the prefix pool
  (host arena, disks striped);
* ``remote``: ``kvdrive bench remote``, a prefix written by another process into the remote
  tier (Mooncake Store) vs the local disk vs recompute, beside ``transfer_engine_bench``.
"""

__all__ = ["remote", "ttft"]
