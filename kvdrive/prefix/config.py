"""Settings of the prefix pool: ``PrefixConfig`` (local tiers, admission, I/O depths) and
``RemoteConfig`` (the store shared by every serving node, off unless given).

    PrefixConfig(disks=(PoolPath("/nvme0/kv", 64 << 30),), host_bytes=16 << 30,
                 remote=RemoteConfig(master="10.0.0.5:50051", metadata="http://10.0.0.5:8080/metadata"))

Every field is a plain value, so a configuration file's ``prefix`` and ``prefix.remote``
tables fill them (``RemoteConfig.from_dict``); mistakes are one ``KvdriveError`` naming the
field and a value that works.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from kvdrive.errors import KvdriveError
from kvdrive.quant.formats import check_kv_dtype
from kvdrive.storage.extent_files import DEFAULT_EXTENT_BYTES
from kvdrive.storage.pool import PoolPath

INDEX_FILE = "kvdrive-prefix.sqlite"
BACKENDS = ("mooncake",)
PROTOCOLS = ("tcp", "rdma")


@dataclass(frozen=True)
class RemoteConfig:
    """Where the shared store is and how much kvdrive waits for it.

    ``master``: the Mooncake master's RPC address (host:port). ``metadata``: the transfer
    engine's metadata server (``http://host:port/metadata``, the master's own with
    ``--enable_http_metadata_server``), or ``P2PHANDSHAKE``. ``local_hostname``: the
    address other nodes reach this one at ("" = the local address that routes to the
    master). ``segment_bytes``: memory this process lends to the pool (0 = none: a
    ``mooncake_client`` pool holder, or other nodes, keep the data); the store's own
    eviction keeps it within the lent segments.

    A call to the store that takes longer than ``timeout_s`` plus its bytes at
    ``floor_gbps`` is a miss; a timeout or an unreachable master opens a circuit breaker
    that skips the store for ``retry_after_s`` (then one call tries again).
    ``admit_after``: sightings of a chunk, on any node, before it is written to the store.
    ``write_buffer_bytes``: registered memory holding chunks on their way to the store; a
    store that finds it full skips the rest (counted). ``connect_wait_s``: how long opening
    the pool waits for the connection (it goes on in the background)."""

    master: str
    metadata: str = "P2PHANDSHAKE"
    backend: str = "mooncake"
    protocol: str = "tcp"
    rdma_devices: str = ""
    local_hostname: str = ""
    segment_bytes: int = 0
    buffer_bytes: int = 16 << 20  # the client's own transfer buffer (kvdrive moves data through registered memory)
    timeout_s: float = 1.0
    floor_gbps: float = 0.5
    retry_after_s: float = 10.0
    admit_after: int = 2
    write_buffer_bytes: int = 256 << 20
    connect_wait_s: float = 5.0
    flush_s: float = 10.0  # what close() waits for chunks still on their way to the store
    setup_retries: int = 1  # the store's connection attempts at setup (each ~4 s against a dead master)
    replicas: int = 1
    key_prefix: str = "kvdrive/"
    known_keys: int = 1 << 16  # keys whose remote state (present, seen) this node remembers

    def __post_init__(self):
        host, _, port = self.master.rpartition(":") if isinstance(self.master, str) else ("", "", "")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise KvdriveError(
                f"prefix.remote.master must be host:port of the Mooncake master, e.g. "
                f"'127.0.0.1:50051'; got {self.master!r}"
            )
        if self.metadata != "P2PHANDSHAKE" and not self.metadata.startswith(("http://", "etcd://", "redis://")):
            raise KvdriveError(
                f"prefix.remote.metadata is a metadata server URL (e.g. 'http://127.0.0.1:8080/metadata') "
                f"or 'P2PHANDSHAKE'; got {self.metadata!r}"
            )
        if self.backend not in BACKENDS:
            raise KvdriveError(f"prefix.remote.backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.protocol not in PROTOCOLS:
            raise KvdriveError(f"prefix.remote.protocol must be one of {', '.join(PROTOCOLS)}; got {self.protocol!r}")
        for name in ("timeout_s", "floor_gbps", "retry_after_s"):
            if not getattr(self, name) > 0:
                raise KvdriveError(f"prefix.remote.{name} must be > 0; got {getattr(self, name)}")
        for name in ("connect_wait_s", "flush_s", "segment_bytes"):
            if not getattr(self, name) >= 0:
                raise KvdriveError(f"prefix.remote.{name} must be >= 0; got {getattr(self, name)}")
        for name in ("admit_after", "setup_retries", "replicas", "known_keys"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise KvdriveError(f"prefix.remote.{name} must be an integer >= 1; got {getattr(self, name)!r}")
        if self.buffer_bytes < 1 << 20 or self.write_buffer_bytes < 1 << 20:
            raise KvdriveError("prefix.remote.buffer_bytes and write_buffer_bytes must be >= 1 MiB (1048576)")
        if not isinstance(self.key_prefix, str) or not self.key_prefix.endswith("/"):
            raise KvdriveError(f"prefix.remote.key_prefix must end with '/', e.g. 'kvdrive/'; got {self.key_prefix!r}")

    @property
    def master_host(self) -> str:
        return self.master.rpartition(":")[0]

    @classmethod
    def from_dict(cls, table: dict) -> RemoteConfig:
        """From a configuration file's ``prefix.remote`` table; unknown keys are refused by name."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(table) - names)
        if unknown:
            raise KvdriveError(
                f"prefix.remote: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        if "master" not in table:
            raise KvdriveError("prefix.remote needs master = 'host:port' (the Mooncake master's RPC address)")
        return cls(**table)


@dataclass(frozen=True)
class PrefixConfig:
    """``model`` names the weights when the pool is built without a weights digest (tools
    and tests; ``LLM`` keys by the digest and ignores it). ``disks``: the pool's
    paths with their byte budgets. ``host_bytes``: the pinned host arena (0 = none).
    ``admit_after``: stores of a chunk before it is written to disk (1 = at once).
    ``host_weight``: GB/s weight of the host arena in the stripe (None = measured).
    ``remote``: a store shared by every serving node behind the local tiers (off when None).
    ``kv_dtype``: the chunks' storage format (``bf16``: the model dtype; ``fp8``, ``int8``, ``int4``:
    quantized when stored, dequantized on the GPU when loaded; docs/compression.md)."""

    model: str = ""
    disks: tuple[PoolPath, ...] = ()
    host_bytes: int = 0
    chunk_tokens: int = 256
    admit_after: int = 2
    tenant: str = ""
    index_path: str | None = None  # default: <first disk>/kvdrive-prefix.sqlite
    host_weight: float | None = None
    layers_ahead: int = 4  # staging ring: layers read ahead of the one being imported
    read_depth: int | None = None  # reads in flight per disk; None: storage.disk.read_depth_for(the slot)
    write_depth: int = 8
    direct: str = "auto"
    extent_bytes: int = DEFAULT_EXTENT_BYTES
    seen_capacity: int = 1 << 20  # admission counters kept
    remote: RemoteConfig | None = None
    kv_dtype: str = "bf16"

    def __post_init__(self):
        check_kv_dtype(self.kv_dtype)
        if not self.disks and self.host_bytes <= 0 and self.remote is None:
            raise KvdriveError("prefix pool needs disk paths, host_bytes > 0 or a remote store")
        if self.remote is not None and not isinstance(self.remote, RemoteConfig):
            raise KvdriveError(f"prefix pool: remote is a RemoteConfig or None, got {type(self.remote).__name__}")
        if self.chunk_tokens < 1 or self.admit_after < 1 or self.layers_ahead < 1:
            raise KvdriveError("prefix pool: chunk_tokens, admit_after and layers_ahead must be >= 1")
        if self.read_depth is not None and self.read_depth < 1:
            raise KvdriveError(f"prefix pool: read_depth must be >= 1 or None (by slot size), got {self.read_depth}")
        if self.host_bytes < 0 or (self.host_weight is not None and self.host_weight <= 0):
            raise KvdriveError("prefix pool: host_bytes must be >= 0 and host_weight > 0")

    @property
    def index_file(self) -> str | None:
        if self.index_path is not None:
            return self.index_path
        return os.path.join(self.disks[0].path, INDEX_FILE) if self.disks else None
