"""The shared store behind the prefix pool's remote tier: a small contract and its Mooncake client.

``RemoteStore`` is what the remote tier needs from a distributed key-value store of byte
objects; ``open_store`` picks an implementation by ``RemoteConfig.backend``. The one
implementation is ``MooncakeStore`` (Mooncake Store's ``MooncakeDistributedStore``: DRAM
lent by many nodes, objects moved by its transfer engine over TCP or RDMA, zero-copy from
and into registered buffers). Its module is imported on first use, never at import time.
"""

from __future__ import annotations

import os
import socket
from abc import ABC, abstractmethod

from kvdrive.errors import KvdriveError
from kvdrive.prefix.config import RemoteConfig

# Mooncake Store return codes (mooncake-store/include/types.h) that kvdrive tells apart
NO_AVAILABLE_HANDLE = -200  # no segment has room
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
RPC_FAIL = -900  # the master is unreachable

INSTALL_HINT = (
    "pip install 'kvdrive[remote]' (mooncake-transfer-engine-non-cuda, also on CUDA machines) and the "
    "libraries it links: apt-get install libibverbs1 libnuma1 libcurl4"
)


class StoreDown(Exception):
    """The store cannot be reached at all (the circuit breaker opens), not a per-object miss."""


class RemoteStore(ABC):
    """A shared store of byte objects by name, through blocking calls.

    Contract: any call may block for an unbounded time or fail; the remote tier makes them
    only from its worker threads, under its own deadlines. A call that finds the whole store
    unreachable raises ``StoreDown``; per-object outcomes are returned, one per name:
    ``None`` for success, else a miss reason (``"absent"``, ``"size"``, ``"full"``,
    ``"error"``; a write names an unknown code: ``"error -800"``). ``get_into``/``put_from`` move exactly ``size`` bytes per object between
    the store and memory at ``ptrs``, which must lie in buffers passed to ``register``; a
    buffer stays in use by the store until the call that names it returns."""

    def load(self) -> None:
        """Import the client library (fast, on the caller's thread): a missing one is a ``KvdriveError``."""

    @abstractmethod
    def connect(self) -> None:
        """Join the store (may block for seconds against a dead master); raises ``StoreDown``."""

    @abstractmethod
    def register(self, ptr: int, nbytes: int) -> None: ...

    @abstractmethod
    def unregister(self, ptr: int) -> None: ...

    @abstractmethod
    def exists(self, names: list[str]) -> list[bool]: ...

    @abstractmethod
    def get_into(self, names: list[str], ptrs: list[int], size: int) -> list[str | None]: ...

    @abstractmethod
    def put_from(self, names: list[str], ptrs: list[int], size: int, replace: bool) -> list[str | None]:
        """``replace``: overwrite existing objects (else the first writer's object stays)."""

    @abstractmethod
    def mark(self, names: list[str]) -> None:
        """Create tiny marker objects (a chunk was seen); existing ones stay."""

    @abstractmethod
    def close(self) -> None: ...


class MooncakeStore(RemoteStore):
    """``RemoteStore`` over ``mooncake.store.MooncakeDistributedStore``."""

    def __init__(self, config: RemoteConfig):
        self.config = config
        self._cls = self._client = self._replicate = None

    def load(self) -> None:
        try:
            from mooncake.store import MooncakeDistributedStore, ReplicateConfig
        except ImportError as err:
            why = str(err)  # names a missing library (libibverbs.so.1, ...) where that is the cause
            raise KvdriveError(
                f"prefix.remote: the Mooncake client cannot be imported ({why}); {INSTALL_HINT}"
            ) from None
        self._cls = MooncakeDistributedStore
        self._replicate = ReplicateConfig()
        self._replicate.replica_num = self.config.replicas

    def connect(self) -> None:
        cfg = self.config
        # NOTE: setup holds the GIL throughout (0.3 s against a live master, 4.4 s against a dead one: the whole
        # process stalls), so it is only called once the master's port accepts a connection.
        try:
            socket.create_connection((cfg.master_host, int(cfg.master.rpartition(":")[2])), cfg.timeout_s).close()
        except OSError as err:
            raise StoreDown(f"the master {cfg.master} does not accept connections ({err.strerror or err})") from None
        # NOTE: read by the client at setup; its default (20 attempts, ~90 s against a dead master) outlasts any deadline
        os.environ["MC_STORE_CLIENT_SETUP_RETRIES"] = str(cfg.setup_retries)
        host = cfg.local_hostname or route_address(cfg.master_host)
        # NOTE: read at setup; the transfer engine's RPC binds here, not to the first non-loopback interface
        # (which a machine on loopback alone lacks, and which need not be the one that reaches the master)
        os.environ.setdefault("MC_TCP_BIND_ADDRESS", host)
        client = self._cls()
        rc = client.setup(
            host, cfg.metadata, cfg.segment_bytes, cfg.buffer_bytes, cfg.protocol, cfg.rdma_devices, cfg.master
        )
        if rc != 0:
            raise StoreDown(f"setup against master {cfg.master} returned {rc}")
        self._client = client

    def register(self, ptr: int, nbytes: int) -> None:
        rc = self._client.register_buffer(ptr, nbytes)
        if rc != 0:
            raise StoreDown(f"register_buffer returned {rc}")

    def unregister(self, ptr: int) -> None:
        self._client.unregister_buffer(ptr)

    def exists(self, names: list[str]) -> list[bool]:
        codes = self._client.batch_is_exist(names)
        _raise_if_down(codes)
        return [c == 1 for c in codes]

    def get_into(self, names: list[str], ptrs: list[int], size: int) -> list[str | None]:
        codes = self._client.batch_get_into(names, ptrs, [size] * len(names))
        _raise_if_down(codes)
        return [
            None if c == size else "absent" if c == OBJECT_NOT_FOUND else "size" if c >= 0 else "error" for c in codes
        ]

    def put_from(self, names: list[str], ptrs: list[int], size: int, replace: bool) -> list[str | None]:
        put = self._client.batch_upsert_from if replace else self._client.batch_put_from
        codes = put(names, ptrs, [size] * len(names), self._replicate)
        _raise_if_down(codes)
        # an unknown code is named in the reason: the write-behind counts are the only trace of it
        return [
            None if c in (0, OBJECT_ALREADY_EXISTS) else "full" if c == NO_AVAILABLE_HANDLE else f"error {c}"
            for c in codes
        ]

    def mark(self, names: list[str]) -> None:
        rc = self._client.put_batch(names, [b"1"] * len(names), self._replicate)
        if rc == RPC_FAIL:
            raise StoreDown(f"put_batch returned {rc}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _raise_if_down(codes: list[int]) -> None:
    if any(c == RPC_FAIL for c in codes):
        raise StoreDown(f"the master is unreachable (RPC_FAIL {RPC_FAIL})")


def route_address(host: str) -> str:
    """The local address that routes to ``host`` (no packet is sent), else 127.0.0.1."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


_STORES = {"mooncake": MooncakeStore}


def open_store(config: RemoteConfig) -> RemoteStore:
    """The store named by ``config.backend``, its client library loaded (not yet connected)."""
    store = _STORES[config.backend](config)
    store.load()
    return store
