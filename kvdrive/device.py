"""The one seam where kvdrive decides about devices, streams and events.

Everything else asks this module instead of calling ``torch.cuda`` directly, so
that the same code runs on a CPU-only machine: there streams and events are no-op
stand-ins with the same methods. Importing this module does no device work.
"""

from __future__ import annotations

import contextlib
import functools
import math
import mmap
import weakref

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (its kernels run on CUDA, or interpreted with TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(impl: str, t: torch.Tensor) -> bool:
    """The ``impl`` rule of the paths with a Triton kernel and a torch twin: 'triton' forces the
    kernel (CUDA, or the interpreter on CPU), 'auto' runs it for CUDA tensors when Triton
    imports, anything else ('torch') the reference."""
    return impl == "triton" or (impl == "auto" and t.is_cuda and triton_available())


def resolve(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` picks CUDA when present, else CPU; anything but cpu, cuda, cuda:N
    (of a visible GPU) is a ``KvdriveError``."""
    from kvdrive.errors import KvdriveError

    if device is None or device == "auto":
        return torch.device("cuda" if has_cuda() else "cpu")
    hint = "use cpu, cuda, cuda:N or auto (--device)"
    if not isinstance(device, (str, torch.device)):
        raise KvdriveError(f"device {device!r} is not a device name: {hint}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise KvdriveError(f"device {device!r} is not a device kvdrive knows: {hint}") from None
    if dev.type not in ("cpu", "cuda"):
        raise KvdriveError(f"kvdrive does not run on {dev.type!r} devices: {hint}")
    if dev.type == "cuda" and not has_cuda():
        raise KvdriveError(f"device {device!r} asked for, but no CUDA GPU is visible; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise KvdriveError(
            f"device {device!r} asked for, but {torch.cuda.device_count()} CUDA GPU(s) are visible: "
            f"use cuda:0..cuda:{torch.cuda.device_count() - 1}"
        )
    return dev


class _NullEvent:
    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NullStream:
    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


def new_stream(device: torch.device, high_priority: bool = False, highest: bool = False):
    """A side stream on CUDA, a no-op stand-in on CPU. ``high_priority``: the block scheduler
    starts its kernels' blocks before those of default-priority streams (CUDA graphs captured
    on it keep that per kernel node); ``highest``: before those of high-priority streams too
    (torch maps the request to the device's highest priority)."""
    if device.type != "cuda":
        return _NullStream()
    return torch.cuda.Stream(device=device, priority=-8 if highest else -1 if high_priority else 0)


def new_event(device: torch.device):
    return torch.cuda.Event() if device.type == "cuda" else _NullEvent()


def current_stream(device: torch.device):
    return torch.cuda.current_stream(device) if device.type == "cuda" else _NullStream()


def use_stream(stream):
    """Context manager that makes ``stream`` current (no-op on CPU)."""
    if isinstance(stream, _NullStream):
        return contextlib.nullcontext()
    return torch.cuda.stream(stream)


def to_host_async(t: torch.Tensor) -> torch.Tensor:
    """A copy in pinned host memory, made asynchronously on the current stream: valid once an
    event recorded after it completes (on CPU, a plain copy)."""
    if t.device.type == "cpu":
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


def release_cached(device: torch.device) -> None:
    """Wait for the device, then return the allocator's free cached blocks (before replacing
    large buffers by others of different sizes; no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pinned_empty(nbytes: int) -> torch.Tensor:
    """``nbytes`` of page-locked, device-mapped host memory, page-aligned, exactly that size: an
    anonymous mapping registered with CUDA, unregistered when its last tensor is freed.

    NOTE: torch's pinned allocator rounds each block up to a power of two, so an arena of many
    layers can hold up to twice its size in pinned memory. Falls back to that allocator (zeroed)
    where registration fails."""
    mem = mmap.mmap(-1, max(nbytes, 1))
    out = torch.frombuffer(mem, dtype=torch.uint8)[:nbytes]
    cudart = torch.cuda.cudart()
    ptr = out.data_ptr()
    if cudart.cudaHostRegister(ptr, max(nbytes, 1), 3) != cudart.cudaError.success:  # 3: portable | mapped
        return torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)
    weakref.finalize(mem, cudart.cudaHostUnregister, ptr)  # runs before the mapping goes
    return out


def host_zeros(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """Zeros of ``shape`` in host memory, page-locked at their exact size when ``pin`` (a tier's
    pool: torch's pinned allocator would round a 36 GiB pool up to 64 GiB)."""
    if not pin:
        return torch.zeros(shape, dtype=dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    return pinned_empty(nbytes).view(dtype).view(shape)  # a fresh anonymous mapping reads as zeros


def pin_supported() -> bool:
    """Pinned host memory needs a CUDA driver; on CPU-only machines we use plain memory."""
    return has_cuda()
