"""Result files: what every benchmark and evaluation JSON records besides its numbers.

``write_result`` writes ``{"bench", "command", "environment", "config", "results", "notes"}``
for the benchmarks and the evaluation alike (neither imports the other). The environment
names the code (git commit, and whether its tree had uncommitted changes) and the machine
(GPU, driver and CUDA versions, null where there is no GPU), so every number can be traced
to what produced it. A result merged from several runs keeps each run's environment
(``sources``) instead of the merging machine's.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from kvdrive.env import code_commit

REPO = Path(__file__).resolve().parents[1]  # the checkout this package runs from, if it is one


def _run(*cmd: str) -> str | None:
    """stdout of ``cmd`` stripped, or None where it cannot run or fails."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state(repo: Path = REPO) -> dict:
    """``{"commit", "dirty"}`` of the checkout at ``repo``; both None outside a git checkout.
    ``dirty``: tracked files differ from the commit (untracked files do not count). A copy of a
    tree run elsewhere (a GPU machine) names its code with ``KVDRIVE_COMMIT`` instead: a ``.git``
    that came with the copy need not be the source's."""
    stated = code_commit()
    if stated:
        return {"commit": stated, "dirty": None}
    if not (repo / ".git").exists():
        return {"commit": None, "dirty": None}
    commit = _run("git", "-C", str(repo), "rev-parse", "HEAD")
    status = _run("git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def gpu_state() -> dict:
    """``{"gpu", "gpu_memory_gib", "gpu_driver", "cuda"}`` of CUDA device 0; None on a machine without one."""
    if not torch.cuda.is_available():
        return {"gpu": None, "gpu_memory_gib": None, "gpu_driver": None, "cuda": None}
    prop = torch.cuda.get_device_properties(0)
    driver = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    return {
        "gpu": prop.name,
        "gpu_memory_gib": round(prop.total_memory / 2**30, 1),
        "gpu_driver": driver.splitlines()[0] if driver else None,
        "cuda": torch.version.cuda,
    }


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **git_state(),
        **gpu_state(),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


# Variables that only label or quiet a run; every other KVDRIVE_* one can change what is measured.
_LABEL_VARS = ("KVDRIVE_COMMIT", "KVDRIVE_NO_PROGRESS", "KVDRIVE_CACHE_DIR")


def command_line() -> str:
    """The command as run, led by the KVDRIVE_* settings in its environment (they change kernels and rules)."""
    if not sys.argv:
        return ""
    settings = [
        f"{k}={shlex.quote(v)}"
        for k, v in sorted(os.environ.items())
        if k.startswith("KVDRIVE_") and k not in _LABEL_VARS
    ]
    program = os.path.basename(sys.argv[0])
    # kvdrive's entry point (or ``python -m kvdrive``) is "kvdrive"; a bench script is named by its path
    head = ["kvdrive"] if program in ("kvdrive", "__main__.py") else ["python3", shlex.quote(sys.argv[0])]
    return " ".join([*settings, *head, *(shlex.quote(a) for a in sys.argv[1:])])


def write_result(
    path: str | Path,
    name: str,
    config: dict,
    results,
    notes: list[str] | None = None,
    *,
    environment_of: dict | None = None,
    sources: list[dict] | None = None,
) -> Path:
    """Write the result to ``path``. ``environment_of``: the environment to record instead of
    this process's (a merge records its first source's); ``sources``: per merged input file its
    ``{"path", "command", "environment"}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "bench": name,
        "command": command_line(),
        "environment": environment_of or environment(),
        "config": config,
        "results": results,
        "notes": notes or [],
    }
    if sources is not None:
        doc["sources"] = sources
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path
