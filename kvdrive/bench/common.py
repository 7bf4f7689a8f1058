"""What every benchmark records: environment, config, the command line, results as JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from kvdrive import device as dev


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": source_commit(),
    }
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        env.update(gpu=prop.name, gpu_memory_gib=round(prop.total_memory / 2**30, 1), cuda=torch.version.cuda)
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def source_commit() -> str | None:
    """The git commit of the kvdrive source that ran ("+dirty" with uncommitted changes), or None."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def command_line() -> str:
    return "kvdrive " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""


def write_result(path: str | Path, name: str, config: dict, results, notes: list[str] | None = None) -> Path:
    """Write ``{"bench", "command", "environment", "config", "results", "notes"}`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"bench": name, "command": command_line(), "environment": environment(), "config": config,
           "results": results, "notes": notes or []}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def time_ms(fn, device: torch.device, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()``: CUDA events around each call on the GPU, a host clock on CPU."""
    for _ in range(warmup):
        fn()
    dev.synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
