"""Environment variables kvdrive reads, in one place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kvdrive.errors import KvdriveError


def cache_dir() -> Path:
    """Where converted models and probes are cached: ``$KVDRIVE_CACHE_DIR`` or ~/.cache/kvdrive."""
    root = os.environ.get("KVDRIVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvdrive"
    )
    return Path(root)


def progress_enabled() -> bool:
    """Progress bars unless ``KVDRIVE_NO_PROGRESS=1`` (they go to stderr and hide themselves off a TTY)."""
    return os.environ.get("KVDRIVE_NO_PROGRESS", "") not in ("1", "true", "yes")


def native_io_enabled() -> bool:
    """Batched disk reads in native threads unless ``KVDRIVE_NATIVE_IO=0`` (then: Python threads, one read each)."""
    return os.environ.get("KVDRIVE_NATIVE_IO", "") not in ("0", "false", "no")


def split_prefill_enabled() -> bool:
    """Split-KV chunk attention on CUDA by its rule when ``KVDRIVE_SPLIT_PREFILL=1``; off by default
    (its CUDA path is tested on CPU through its twin and has not been timed on a GPU)."""
    return os.environ.get("KVDRIVE_SPLIT_PREFILL", "") in ("1", "true", "yes")


def padded_graphs_enabled() -> bool:
    """Kept decode graphs per padded batch size for caches that take them (the paged cache);
    ``KVDRIVE_PADDED_GRAPHS=0`` captures one graph per batch instead."""
    return os.environ.get("KVDRIVE_PADDED_GRAPHS", "1").strip().lower() not in ("0", "false", "no")


PREFILL_KERNELS = ("flash", "cudnn", "triton")


def prefill_kernel() -> str:
    """The kernel of a prefill chunk's attention on CUDA: ``KVDRIVE_PREFILL_KERNEL`` = ``flash``
    (torch's flash op, one causal call: the default), ``cudnn`` (the prefix and the chunk's own
    keys as two calls, each free to run cuDNN's attention, merged by log-sum-exp) or ``triton``
    (kvdrive's own flash kernel, ``kvdrive.cache.flash_prefill``)."""
    value = os.environ.get("KVDRIVE_PREFILL_KERNEL", "flash").strip().lower() or "flash"
    if value not in PREFILL_KERNELS:
        raise KvdriveError(
            f"KVDRIVE_PREFILL_KERNEL must be flash, cudnn or triton, got {value!r}: unset it or pick one"
        )
    return value


def c_compiler() -> str | None:
    """The C compiler for kvdrive's native helpers: ``$CC``, else cc, gcc or clang on PATH."""
    return os.environ.get("CC") or next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def kvdrive_variables() -> dict[str, str]:
    """Every ``KVDRIVE_*`` variable, as text (``kvdrive serve`` reads its settings from them)."""
    return {k: v for k, v in os.environ.items() if k.startswith("KVDRIVE_")}


def code_commit() -> str | None:
    """``$KVDRIVE_COMMIT``: the commit a copied tree's results name (see ``kvdrive.results.git_state``)."""
    return os.environ.get("KVDRIVE_COMMIT") or None
