"""The roofline of one decode step: the least time the bytes it must move can take.

A decode step reads every weight once and the KV its attention sees from GPU memory,
and pulls over PCIe the KV that is not on the GPU yet. With compute and transfer
perfectly overlapped the step can be no faster than the slower of the two:

    compute_s  = (weight_bytes + gpu_kv_bytes) / hbm_bw
    transfer_s = pcie_bytes / h2d_bw
    disk_s     = disk_bytes / disk_bw              (disk-backed systems only)
    step_s     = max(compute_s, transfer_s, disk_s)   bound tokens/s = batch / step_s

``disk_bw`` is random whole-slot reads at the KV slot size and queue depth 32 on the run's
first disk path (``kvdrive.commands.probe.measure``): what the disk gives the reads a step makes.

FLOPs are left out: decode of a 7-8B model at the batches benchmarked here is bound by
memory traffic. Both bandwidths are measured in the same run as the decode (``measure``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kvdrive.bench.common import time_ms

FORMULA = (
    "bound step = max((weight bytes + KV/summary bytes read on the GPU) / HBM bw, "
    "bytes host->GPU per step / H2D bw); bound tokens/s = batch / bound step; "
    "fraction_of_bound = measured tokens/s / bound tokens/s. HBM bw = device-to-device copy "
    "(bytes read + written) / s; H2D bw = one pinned host->GPU copy, median of repeats. Disk-backed "
    "rows: the bound is also at least (disk reads + read-ahead + reads behind per step) x slot bytes / disk bw, disk bw = "
    "random slot reads at the KV slot size, queue depth 32, on the first --disk path"
)


@dataclass(frozen=True)
class Bandwidths:
    """Bytes/s measured on this machine; ``h2d`` is None without a GPU."""

    hbm: float  # GPU memory (on CPU: host memory copy), read + written bytes per second
    h2d: float | None  # pinned host -> GPU
    probe_bytes: int
    disk: float | None = None  # random KV-slot reads from the disk pool's first path; None: not measured
    disk_latency_ms: float | None = None  # one such read alone (not in the bound: the row's notes use it)

    def as_dict(self) -> dict:
        out = {
            "hbm_gbps": round(self.hbm / 1e9, 2),
            "h2d_gbps": None if self.h2d is None else round(self.h2d / 1e9, 2),
            "probe_mib": self.probe_bytes >> 20,
        }
        if self.disk is not None:
            out["disk_read_gbps"] = round(self.disk / 1e9, 3)
        if self.disk_latency_ms is not None:
            out["disk_read_latency_ms"] = round(self.disk_latency_ms, 3)
        return out


@dataclass(frozen=True)
class StepBytes:
    """Bytes one decode step of the whole batch must move."""

    weights: int  # read from GPU memory once per step
    gpu_kv: int  # KV (and key summaries) read from GPU memory by attention
    pcie: int  # host -> GPU
    disk: int = 0  # read from the disk pool (misses of the host arena, read-ahead included)


@dataclass(frozen=True)
class Bound:
    compute_ms: float
    transfer_ms: float
    step_ms: float
    tokens_per_s: float
    limit: str  # "compute" (HBM), "transfer" (PCIe) or "disk"
    disk_ms: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def bound(batch: int, step: StepBytes, bw: Bandwidths) -> Bound | None:
    """The roofline bound of a step of ``batch`` tokens; None if bytes must cross PCIe or
    come from disk and that bandwidth was not measured (a CPU run has no H2D)."""
    if (step.pcie and bw.h2d is None) or (step.disk and bw.disk is None):
        return None
    parts = {
        "compute": (step.weights + step.gpu_kv) / bw.hbm,
        "transfer": step.pcie / bw.h2d if step.pcie else 0.0,
        "disk": step.disk / bw.disk if step.disk else 0.0,
    }
    limit = max(parts, key=parts.get)
    s = parts[limit]
    return Bound(parts["compute"] * 1e3, parts["transfer"] * 1e3, s * 1e3, batch / s, limit, parts["disk"] * 1e3)


def weight_bytes_read(model: torch.nn.Module) -> int:
    """Bytes of the parameters one decode step reads: all of them, except an untied input
    embedding (a step reads only B rows of it)."""
    params = dict(model.named_parameters())  # tied tensors appear once
    total = sum(p.numel() * p.element_size() for p in params.values())
    emb = next((p for n, p in params.items() if n.endswith("embed_tokens.weight")), None)
    return total - emb.numel() * emb.element_size() if emb is not None and "lm_head.weight" in params else total


def measure(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> Bandwidths:
    """HBM bandwidth (device-to-device copy of ``nbytes``) and pinned H2D bandwidth (one
    ``nbytes`` copy), median of ``repeats``. On CPU, a host memory copy stands for HBM."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    hbm = 2 * nbytes / (time_ms(lambda: dst.copy_(src), device, repeats, warmup=1) * 1e-3)
    h2d = None
    if device.type == "cuda":
        del src
        host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        h2d = nbytes / (time_ms(lambda: dst.copy_(host, non_blocking=True), device, repeats, warmup=1) * 1e-3)
        del host
    return Bandwidths(hbm, h2d, nbytes)


def measure_disk(path: str, slot_bytes: int, probe_bytes: int = 256 << 20) -> tuple[float, float | None]:
    """(bytes/s of random ``slot_bytes`` reads at queue depth 32, ms of one read alone) in
    ``path`` (made if missing; O_DIRECT where it works), through the pool's own ``DiskDevice``;
    its files are removed after."""
    from pathlib import Path

    from kvdrive.commands.probe import measure

    Path(path).mkdir(parents=True, exist_ok=True)
    p = measure(path, slot_bytes=slot_bytes, probe_bytes=probe_bytes)
    return p.read_gbps * 1e9, p.read_latency_ms
