"""Batched disk I/O outside the GIL: ``native/batch_io.c``, compiled on first use, via ctypes.

Why: a decode step of the disk tier reads hundreds of scattered slots. Issued one
``preadv`` per Python task, each read holds the GIL for tens of microseconds (task
hand-off, syscall wrapper, bookkeeping) on 32 worker threads, and that Python time
competes with the engine thread that launches the GPU's work; at ~800 reads a step it
was the step; write-behind of the groups a step fills cost the same per write.
``transfer_batch`` reads or writes a whole batch of runs in one foreign call on POSIX
threads; ctypes drops the GIL for all of it.

The library is built once per source and compiler into ``env.cache_dir()/native`` with
the system C compiler (the one Triton also needs). Without one, or with
``KVDRIVE_NATIVE_IO=0``, ``reader()`` returns None and the disk tier reads with Python
threads, one task per run, after one ``NativeIOWarning`` that names the fix.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

from kvdrive import env

SOURCE = Path(__file__).parent / "native" / "batch_io.c"
MAX_RUN_SLOTS = 256  # MAX_IOV in batch_io.c: iovecs of one run

_lock = threading.Lock()
_state: dict = {}  # "fn": the loaded function or None, once tried


class NativeIOWarning(UserWarning):
    """The native batched reader could not be built; disk reads fall back to Python threads."""


def _build(compiler: str) -> Path:
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + compiler.encode()).hexdigest()[:16]
    out = env.cache_dir() / "native" / f"batch_io-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            cmd = [compiler, "-O2", "-shared", "-fPIC", "-pthread", "-o", tmp, str(SOURCE)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                raise OSError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
            os.replace(tmp, out)  # atomic: concurrent builders each publish a whole library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


def reader():
    """The loaded ``kvd_pio_batch``, or None (disabled, or no compiler: warned once)."""
    with _lock:
        if "fn" not in _state:
            _state["fn"] = _load()
        return _state["fn"]


def _load():
    if not env.native_io_enabled():
        return None
    compiler = env.c_compiler()
    try:
        if compiler is None:
            raise OSError("no C compiler on PATH (cc, gcc, clang) and $CC is unset")
        fn = ctypes.CDLL(str(_build(compiler))).kvd_pio_batch
    except OSError as err:
        warnings.warn(
            f"kvdrive's batched disk reader is unavailable ({err}); disk reads use Python threads, "
            f"which costs the engine thread time per read. Install a C compiler (e.g. apt install gcc) "
            f"or set CC; KVDRIVE_NATIVE_IO=0 silences this",
            NativeIOWarning,
            stacklevel=3,
        )
        return None
    p, i32 = ctypes.c_void_p, ctypes.c_int32
    fn.argtypes = [ctypes.c_int64, p, p, p, p, p, i32, i32, i32, p, ctypes.c_int64, p, p, p, p]
    fn.restype = ctypes.c_int
    return fn


def xxh3_address() -> int | None:
    """Address of ``XXH3_64bits`` in the xxhash package's own extension (the function behind
    ``xxhash.xxh3_64_intdigest``), for the native threads to checksum without the GIL; None
    where that build does not export it (then Python checksums, holding the GIL per slot)."""
    with _lock:
        if "xxh3" not in _state:
            try:
                import xxhash._xxhash as ext

                _state["xxh3"] = ctypes.cast(ctypes.CDLL(ext.__file__).XXH3_64bits, ctypes.c_void_p).value
            except (OSError, AttributeError, ImportError):
                _state["xxh3"] = None
        return _state["xxh3"]


def transfer_batch(
    fn,
    fds: np.ndarray,
    offsets: np.ndarray,
    first: np.ndarray,
    bases: np.ndarray,
    lens: np.ndarray,
    threads: int,
    dontneed: bool,
    write: bool = False,
    hash_len: int = 0,
    sums: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read run r (``fds[r]`` from ``offsets[r]``) into buffers ``first[r]:first[r+1]`` of
    (``bases``, ``lens``), or write them there (``write``); returns per run (status: 0 ok,
    -1 short, else errno; latency in s) and, with ``hash_len`` where ``xxh3_address`` has
    the hash, per buffer: a read's mismatch against ``sums`` (bool), or a write's xxh3 of the
    first ``hash_len`` bytes in ``sums`` (filled in place); else None. The caller keeps every
    buffer alive and, for O_DIRECT, aligned."""
    n = len(fds)
    fds, offsets, first = (
        np.ascontiguousarray(a, dtype=t) for a, t in ((fds, np.int32), (offsets, np.int64), (first, np.int64))
    )
    bases, lens = np.ascontiguousarray(bases, dtype=np.uint64), np.ascontiguousarray(lens, dtype=np.int64)
    if len(first) != n + 1 or first[-1] != len(bases) or len(lens) != len(bases):
        raise ValueError("transfer_batch: first must hold n_runs + 1 offsets into bases/lens")
    if n and np.diff(first).max() > MAX_RUN_SLOTS:
        raise ValueError(f"transfer_batch: a run may have at most {MAX_RUN_SLOTS} buffers")
    status = np.zeros(n, dtype=np.int32)
    nanos = np.zeros(n, dtype=np.int64)
    hash_fn = xxh3_address() if hash_len else None
    bad = np.zeros(len(bases), dtype=np.uint8)
    if hash_fn is not None and (
        sums is None or sums.dtype != np.uint64 or len(sums) != len(bases) or not sums.flags.c_contiguous
    ):
        raise ValueError("transfer_batch: sums must be a contiguous uint64 array, one per buffer")
    if n:
        fn(
            n,
            fds.ctypes.data,
            offsets.ctypes.data,
            first.ctypes.data,
            bases.ctypes.data,
            lens.ctypes.data,
            threads,
            int(dontneed),
            int(write),
            hash_fn,
            hash_len if hash_fn else 0,
            sums.ctypes.data if hash_fn else None,
            bad.ctypes.data,
            status.ctypes.data,
            nanos.ctypes.data,
        )
    return status, nanos * 1e-9, (None if hash_fn is None else (sums if write else bad.astype(bool)))


@functools.cache
def _chars(nbytes: int):
    return ctypes.c_char * nbytes


def at(address: int, nbytes: int):
    """``nbytes`` of memory at ``address`` as a buffer (no copy): what a checksum reads. ~0.4 us,
    a quarter of ``view``; a decode step checks hundreds."""
    return _chars(nbytes).from_address(address)


def view(address: int, nbytes: int) -> memoryview:
    """A writable byte view of ``nbytes`` of memory at ``address`` (no copy)."""
    return memoryview(at(address, nbytes)).cast("B")
