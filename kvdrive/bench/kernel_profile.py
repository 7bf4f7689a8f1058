"""``kvdrive bench decode --profile DIR``: which GPU kernels a decode step spends its time in.

The step breakdown (``--breakdown-steps``) says which phase costs what, from events between
phases of eager steps. This says which kernels: torch.profiler over a few steps exactly as
they are timed (a CUDA graph where the system captures one), written as a Chrome trace
(open in chrome://tracing or Perfetto) and a table of the kernels by GPU time per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def profile_steps(step, ids: torch.Tensor, steps: int, out_dir: Path, name: str) -> dict:
    """Run ``steps`` decode steps under torch.profiler; writes ``name``.trace.json and returns
    {"trace": path, "ms_per_step": total, "calls_per_step": n, "kernels": [{name, calls_per_step, ms_per_step}]}."""
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            ids = step(ids).argmax(-1, keepdim=True)
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)
    trace = out_dir / f"{name}.trace.json"
    prof.export_chrome_trace(str(trace))
    table = kernel_table(trace, steps)
    (out_dir / f"{name}.kernels.json").write_text(json.dumps(table, indent=1) + "\n")
    return {"trace": str(trace), **table}


def kernel_table(trace: Path, steps: int, top: int = 40) -> dict:
    """GPU kernels and copies of a Chrome trace grouped by name: calls and ms per step, the
    ``top`` costliest first (streams overlap, so the total can exceed the step). Read from
    the trace, so kernels replayed inside a CUDA graph count too (they carry no CPU op to
    attribute them to). Without GPU events (a CPU run), CPU ops instead."""
    events = [e for e in json.loads(Path(trace).read_text()).get("traceEvents", []) if e.get("ph") == "X"]
    gpu = ("kernel", "gpu_memcpy", "gpu_memset")
    cats = gpu if any(e.get("cat") in gpu for e in events) else ("cpu_op",)  # CPU run: ops, nested times
    by_name: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") in cats:
            acc = by_name.setdefault(e["name"], [0, 0.0])
            acc[0] += 1
            acc[1] += e.get("dur", 0) / 1e3  # us -> ms
    total = sum(v[1] for v in by_name.values())
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    return {
        "steps": steps,
        "events": "gpu" if cats == gpu else "cpu_op (inclusive: nested ops count twice)",
        "ms_per_step": total / steps,
        "calls_per_step": sum(v[0] for v in by_name.values()) / steps,
        "kernels": [
            {"name": n[:160], "calls_per_step": c / steps, "ms_per_step": ms / steps} for n, (c, ms) in rows[:top]
        ],
    }
