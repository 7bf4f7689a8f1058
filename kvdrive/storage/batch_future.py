"""``BatchFuture``: the per-item results of a batch of slot reads or writes.

A batch is split into parts (runs of one extent, devices of a pool), each done on its own
worker; ``result()`` waits for them all and gives one result per item, in input order
(None: done; else a miss or error reason).
"""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np


class BatchFuture:
    """Per-item results of a batch split into parts (runs, devices); ``result()`` waits and
    restores input order. A part is anything with ``done()`` and ``result() -> list``."""

    def __init__(self, n: int, parts: list[tuple[list[int], Future | BatchFuture]]):
        self._n = n
        self._parts = parts

    def done(self) -> bool:
        return all(f.done() for _, f in self._parts)

    def result(self) -> list[str | None]:
        out: list[str | None] = [None] * self._n
        for idx, fut in self._parts:
            for i, r in zip(idx, fut.result()):
                out[i] = r
        return out

    def ok(self) -> np.ndarray:
        """(n,) bool: which items succeeded (waits like ``result``)."""
        return np.array([r is None for r in self.result()], dtype=bool)
