"""Where the time of an eager decode step goes, phase by phase (``TieredSparseKVCache.profile``);
``no_mark``, the mark of a step that is not profiled."""

from __future__ import annotations

import time

import torch


class StepProfile:
    """Per-phase GPU time of eager decode steps, from events between the phases of each sparse
    layer: ``compute`` is everything since the previous mark (projections, MLP, the model's
    other layers), ``prefetch_wait`` the wait on the side stream's prefetch, ``select`` scoring
    and top-k, ``disk_resolve`` the host sync and disk reads, ``sync_fetch`` the cache update
    and the fetch of what the prefetch missed, ``attention`` the sparse attention kernel.
    Costs one event per mark; ``summary`` synchronizes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[tuple[str, object]] = []
        self.totals: dict[str, float] = {}

    def mark(self, name: str) -> None:
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
        else:
            e = time.perf_counter()
        self.marks.append((name, e))

    def summary(self, steps: int) -> dict[str, float]:
        """Milliseconds per step by phase (marks reset)."""
        if self.device.type == "cuda" and self.marks:
            self.marks[-1][1].synchronize()
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            ms = a.elapsed_time(b) if self.device.type == "cuda" else (b - a) * 1e3
            self.totals[name] = self.totals.get(name, 0.0) + ms
        self.marks = self.marks[-1:]
        out = {k: v / max(steps, 1) for k, v in self.totals.items()}
        self.totals = {}
        return out


def no_mark(name: str) -> None:
    """``StepProfile.mark`` where nothing is timed: no profile set, graphed steps, predictions and
    the initial placement."""
