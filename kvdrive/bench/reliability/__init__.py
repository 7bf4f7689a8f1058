"""Reliability benchmarks: faults, crashes and leaks, with outputs compared to clean runs.

* ``faults``: ``kvdrive bench faults``, every injected fault (``kvdrive.storage.faults``)
  across prefix reuse, tenants and tiered decode (wait and defer), then the crash trials;
* ``crash``: kill -9 in the middle of a prefix pool's stores and evictions, several processes
  on one pool directory, a file system that fills up;
* ``workloads``: the prompts, rows and configurations both share;
* ``soak``: ``kvdrive bench soak``, thousands of ``generate`` calls with the disk tier,
  sampling RSS, fds, threads and disk bytes.
"""

__all__ = ["crash", "faults", "soak", "workloads"]
