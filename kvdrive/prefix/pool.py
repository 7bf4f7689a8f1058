"""The prefix pool: KV of repeated prompt prefixes, reused across requests and restarts.

    pool = PrefixPool(model.config, torch.bfloat16,
                      PrefixConfig(model="llama-3.1-8b", disks=(PoolPath("/nvme0/kv", 64 << 30),),
                                   host_bytes=16 << 30))
    hit = pool.lookup(prompt_ids)                 # longest stored prefix, one call
    done = pool.load(model, cache, seq, prompt_ids)   # KV of `done` tokens now in the cache
    ... prefill prompt_ids[done:] ...
    pool.store(cache, seq, prompt_ids)            # full chunks of the prompt
    pool.stats(); pool.close()

It plugs into the generation loop as ``prefix=pool`` (``load``/``store`` hooks).

Chunks of ``chunk_tokens`` tokens are addressed by a chained SHA-256 (``keys``)
in a namespace of model, dtype, layout and tenant. Every chunk admitted to disk is
written once to one disk of the pool (smooth weighted round-robin by measured read
bandwidth, so a prefix's chunks spread over all disks in proportion to their speed),
with a row in a crash-safe SQLite index (``index``): the pool survives a
restart. Host memory is a tier of the same pool: a pinned arena that keeps a copy of
a bandwidth-proportional share of the chunks (and chunks not yet admitted to disk),
lost on restart. A load reads each chunk from wherever it is, all devices at once,
layer by layer (``load``). Admission: a chunk goes to disk on its
``admit_after``-th store (default 2: seen twice). Capacity: each disk's extents are
preallocated under its budget (a physical cap); when full, its least recently used
chunks are evicted, never those of the prompt being stored (admission, placement and
eviction: ``placement``). A chunk that fails its checksum or its read is dropped and
recomputed, never served. With ``PrefixConfig.remote``
a store shared by every serving node sits behind both (``remote``, docs/scale-out.md).

Keys name the weights by a digest of them (``weights``, from
``kvdrive.models.identity.weights_digest``: ``LLM`` passes it), not by a name. A pool's
disk directories have one owner (``dir_lock``): a second pool on them is refused; share
one pool instead (``LLM(prefix_cache=pool, tenant=...)``). A store that cannot complete
for a reason the pool can live with (a full file system, a file-size limit, a write or
sync error, an index that cannot be written) is skipped, counted (``store_skipped``) and
warned about once per cause (``PrefixPoolWarning``); the request never fails for it. A
damaged index found while serving turns the disk side off, with the same warning.
"""

from __future__ import annotations

import os
import sqlite3
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from kvdrive.errors import KvdriveError
from kvdrive.prefix.config import INDEX_FILE, PrefixConfig, RemoteConfig  # noqa: F401 (re-exported)
from kvdrive.prefix.index import PrefixIndex, error_kind, index_error
from kvdrive.prefix.keys import PrefixNamespace, bind_sums, chunk_keys
from kvdrive.prefix.load import ChunkSource, ImportResult, Staging, import_chunks
from kvdrive.prefix.placement import FAILED, drop, measure_host_gbps, restore, store_chunks
from kvdrive.prefix.remote import PER_CHUNK, RemoteStats, RemoteTier
from kvdrive.prefix.store import ChunkWriter
from kvdrive.storage.dir_lock import DirectoryInUse
from kvdrive.storage.disk import read_depth_for
from kvdrive.storage.host import HostTier
from kvdrive.storage.layout import GroupLayout
from kvdrive.storage.pool import DiskPool

PERSIST_NAME = "prefix"  # extent files kvdrive-prefix-<n>.extent


class PrefixPoolWarning(UserWarning):
    """The prefix pool skipped stores or turned its disk side off, for a reason it can live with."""


class PrefixHit(NamedTuple):
    """The longest stored prefix of a prompt."""

    tokens: int  # chunks * chunk_tokens
    chunks: int
    keys: list[bytes]
    sources: list[ChunkSource]  # where each chunk is read from (host preferred)


@dataclass(frozen=True)
class LoadReport:
    tokens: int
    chunks_from_disk: int
    chunks_from_host: int
    bytes_read: int
    seconds: float
    corrupt: int  # chunks dropped (checksum / I/O) during this load
    chunks_from_remote: int = 0
    remote_misses: int = 0  # chunks the remote store had but did not serve (timeout, checksum, ...)

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class PrefixStats:
    lookups: int
    hits: int
    hit_tokens: int
    loaded_bytes: int
    corrupt_chunks: int
    stored_chunks_disk: int
    stored_chunks_host: int
    evicted_disk: int
    evicted_host: int
    index_chunks: int
    host_chunks: int
    disk_bytes_used: int
    disk_physical_bytes: int
    disk_capacity: int
    host_bytes_used: int
    host_capacity: int
    weights: dict = field(default_factory=dict)
    store_skipped: int = 0  # chunks not stored for a recoverable reason (full disk, write error, ...)
    disk_off: str = ""  # why the disk side was turned off while serving ("" = on)
    remote: RemoteStats | None = None  # the remote tier's counters (None: no remote tier)


class PrefixPool:
    def __init__(self, model_config, dtype: torch.dtype, config: PrefixConfig, weights: str | None = None):
        """``weights``: a digest of the model's weights (``kvdrive.models.identity.weights_digest``),
        the model's identity in every key; None: ``config.model`` names it."""
        self.config = config
        self.weights = weights or config.model
        if not self.weights:
            raise KvdriveError(
                "prefix pool: name the weights: pass weights=weights_digest(model) "
                "(kvdrive.models.identity; LLM does) or PrefixConfig(model=...)"
            )
        self.layout = GroupLayout.from_config(model_config, dtype, config.chunk_tokens, config.kv_dtype)
        self.num_layers = self.layout.num_layers
        self._ns = {}
        self._counters = dict.fromkeys(
            (
                "lookups",
                "hits",
                "hit_tokens",
                "loaded_bytes",
                "corrupt",
                "disk_in",
                "host_in",
                "evicted_disk",
                "evicted_host",
                "store_skipped",
            ),
            0,
        )
        self._warned: set[str] = set()
        self.disk_off = ""
        self.last_load: LoadReport | None = None
        self.host = HostTier(self.layout, config.host_bytes) if config.host_bytes else None
        self._host: OrderedDict[bytes, list[int]] = OrderedDict()  # key -> host slot per layer; LRU first
        self.pool = self.index = None
        if config.disks:
            es = max(1, config.extent_bytes // self.layout.slot_bytes)
            geometry = f"{self.layout.name}-L{self.num_layers}-slot{self.layout.slot_bytes}-ext{es}"
            PrefixIndex.check_geometry(config.index_file, geometry)  # before any extent is touched
            try:
                self.pool = DiskPool.open(
                    list(config.disks),
                    self.layout,
                    direct=config.direct,
                    read_depth=config.read_depth or read_depth_for(self.layout.slot_bytes),
                    write_depth=config.write_depth,
                    extent_bytes=config.extent_bytes,
                    persist_name=PERSIST_NAME,
                )
            except DirectoryInUse as err:
                raise KvdriveError(
                    f"{err}: a prefix pool directory has one owner at a time (two would hand out "
                    "the same slots). Give this pool its own directory, or share one pool: pass "
                    "the same PrefixPool to every LLM (LLM(prefix_cache=pool, tenant=...))"
                ) from None
            try:
                self.index = PrefixIndex(config.index_file, geometry, config.seen_capacity)
                self._paths = {os.path.abspath(d.path): i for i, d in enumerate(self.pool.devices)}
                restore(self)
            except BaseException:
                self.close()
                raise
        self.host_weight = config.host_weight or (measure_host_gbps(self.host) if self.host else 0.0)
        self._disk_credit = [0.0] * len(config.disks)
        self._host_credit = [0.0, 0.0]  # host vs all disks
        self._writer = ChunkWriter(self.layout, config.layers_ahead)
        self.staging = Staging(self.layout, config.layers_ahead)
        self.remote = None
        if config.remote is not None:
            try:
                self.remote = RemoteTier(self.layout, config.remote, warn=self._warn)
            except BaseException:
                self.close()
                raise

    def namespace(self, tenant: str | None = None) -> PrefixNamespace:
        tenant = self.config.tenant if tenant is None else tenant
        if tenant not in self._ns:
            self._ns[tenant] = PrefixNamespace(
                self.weights,
                str(self.layout.dtype).removeprefix("torch."),
                self.layout.name,
                self.num_layers,
                self.config.chunk_tokens,
                tenant,
            )
        return self._ns[tenant]

    # -- lookup / load ------------------------------------------------------------------

    def lookup(self, tokens, tenant: str | None = None, max_chunks: int | None = None) -> PrefixHit:
        """Longest prefix of ``tokens`` whose every chunk is stored (host copy preferred)."""
        keys = chunk_keys(tokens, self.namespace(tenant), max_chunks)
        on_disk = self._index("get", keys, default={})
        remote = {}
        if self.remote is not None:  # one call for every chunk the local tiers lack
            remote = self.remote.present([k for k in keys if k not in self._host and k not in on_disk])
        sources = []
        for k in keys:
            if k in self._host:
                sources.append(ChunkSource("host", -1, self._host[k]))
            elif k in on_disk:
                ch = on_disk[k]
                sources.append(
                    ChunkSource("disk", self._paths[os.path.abspath(ch.path)], ch.slots, bind_sums(k, ch.sums))
                )
            elif remote.get(k) == "present":
                sources.append(ChunkSource("remote", -1, [], None, k))
            else:
                break
        n = len(sources)
        return PrefixHit(n * self.config.chunk_tokens, n, keys[:n], sources)

    def load(self, model, cache, seq_id: int, prompt_ids, tenant: str | None = None) -> int:
        """Import the KV of the longest stored prefix of ``prompt_ids`` into ``cache`` (sequence
        ``seq_id``, empty); returns its length in tokens, a whole number of chunks and
        < len(prompt_ids). Chunks that fail to read are dropped and the shorter prefix loaded."""
        t0 = time.perf_counter()
        self._counters["lookups"] += 1
        if cache.length(seq_id) != 0:
            raise KvdriveError(f"prefix load needs an empty sequence; {seq_id} has {cache.length(seq_id)} tokens")
        device = cache.device
        hit = self.lookup(prompt_ids, tenant, max_chunks=(len(prompt_ids) - 1) // self.config.chunk_tokens)
        sources, keys, corrupt, remote_misses = hit.sources, hit.keys, 0, 0
        res = ImportResult(0, False, None, 0, 0, 0.0)
        while sources:
            remote_keys = [s.key for s in sources if s.tier == "remote"]
            reading = self.remote.open_read(remote_keys, self.staging.ring) if remote_keys else None
            if remote_keys and reading is None:  # the store is unusable now: the local part only
                first = next(i for i, s in enumerate(sources) if s.tier == "remote")
                res = ImportResult(first, True, "busy", 0, 0, 0.0)
            else:
                res = import_chunks(
                    cache, seq_id, sources, self.layout, self.pool, self.host, self.staging, device, reading
                )
            if not res.failed:
                break
            if sources[res.chunks].tier == "remote":
                lost = [s.key for s in sources[res.chunks :] if s.tier == "remote"]
                self.remote.forget(lost, res.reason)
                remote_misses += len(lost)
                if res.reason in PER_CHUNK:  # a store that stopped answering warns by itself
                    self._warn(
                        f"remote:{res.reason}",
                        f"prefix pool: a chunk from the remote store was not served "
                        f"({res.reason}: {_REMOTE_WHY.get(res.reason, 'listed, then not read')}): recomputed, "
                        "never served, and written again (stats().remote.misses counts them)",
                    )
            else:
                corrupt += 1
                drop(self, keys[res.chunks])
            sources, keys = sources[: res.chunks], keys[: res.chunks]
        n = len(sources)
        n_remote = sum(s.tier == "remote" for s in sources)
        if n_remote:
            self.remote.loaded(n_remote)
        if n:
            self._counters["hits"] += 1
            self._counters["hit_tokens"] += n * self.config.chunk_tokens
            self._counters["loaded_bytes"] += res.bytes_disk + res.bytes_host + res.bytes_remote
            for k in keys:
                if k in self._host:
                    self._host.move_to_end(k)
            self._index("touch", keys)
        self._counters["corrupt"] += corrupt
        if corrupt:
            self._warn(
                "corrupt",
                f"{corrupt} stored chunk(s) failed their read or checksum: dropped and recomputed, "
                "never served (stats().corrupt_chunks counts them)",
            )
        n_host = sum(s.tier == "host" for s in sources)
        self.last_load = LoadReport(
            n * self.config.chunk_tokens,
            n - n_host - n_remote,
            n_host,
            res.bytes_disk + res.bytes_host + res.bytes_remote,
            time.perf_counter() - t0,
            corrupt,
            n_remote,
            remote_misses,
        )
        return n * self.config.chunk_tokens

    # -- store --------------------------------------------------------------------------

    def store(self, cache, seq_id: int, prompt_ids, tenant: str | None = None) -> int:
        """Save the full chunks of ``prompt_ids`` whose KV is committed in ``cache`` and not
        stored yet (admission and eviction as in the module doc). Returns chunks written."""
        return store_chunks(self, cache, seq_id, prompt_ids, tenant)

    # -- failures the pool can live with ----------------------------------------------------

    def _skip(self, cause: str, chunks: int, message: str) -> None:
        self._counters["store_skipped"] += chunks
        self._warn(cause, f"prefix pool: {message}; the requests go on (stats().store_skipped counts the chunks)")

    def _warn(self, cause: str, message: str) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            warnings.warn(message, PrefixPoolWarning, stacklevel=3)

    def _index(self, method: str, *args, default=FAILED):
        """``PrefixIndex.<method>(*args)``, or ``default`` when there is no index or SQLite fails:
        a full or read-only file system skips the store, a damaged index turns the disk side off."""
        if self.index is None:
            return default
        try:
            return getattr(self.index, method)(*args)
        except sqlite3.DatabaseError as err:
            kind = error_kind(err)
            if kind == "damaged":
                self._turn_disk_off(str(index_error(self.config.index_file, err)))
            else:
                self._skip(f"index:{kind}", 0, str(index_error(self.config.index_file, err)))
            return default

    def _turn_disk_off(self, why: str) -> None:
        """Serve from host memory (and recompute) from now on; the disk files stay as they are."""
        self.disk_off = why
        self._warn("disk_off", f"prefix pool: disk side turned off: {why}")
        pool, index, self.pool, self.index = self.pool, self.index, None, None
        pool.close()
        index.close()

    # -- state ----------------------------------------------------------------------------

    def stats(self) -> PrefixStats:
        c = self._counters
        pool = self.pool
        return PrefixStats(
            lookups=c["lookups"],
            hits=c["hits"],
            hit_tokens=c["hit_tokens"],
            loaded_bytes=c["loaded_bytes"],
            corrupt_chunks=c["corrupt"],
            stored_chunks_disk=c["disk_in"],
            stored_chunks_host=c["host_in"],
            evicted_disk=c["evicted_disk"],
            evicted_host=c["evicted_host"],
            index_chunks=self.index.count() if self.index is not None else 0,
            host_chunks=len(self._host),
            disk_bytes_used=pool.bytes_used() if pool else 0,
            disk_physical_bytes=pool.physical_bytes() if pool else 0,
            disk_capacity=pool.bytes_capacity() if pool else 0,
            host_bytes_used=self.host.bytes_used if self.host else 0,
            host_capacity=self.host.bytes_capacity if self.host else 0,
            weights={
                "host": self.host_weight,
                **({d.path: w for d, w in zip(pool.devices, pool.weights)} if pool else {}),
            },
            store_skipped=c["store_skipped"],
            disk_off=self.disk_off,
            remote=self.remote.stats() if self.remote is not None else None,
        )

    def close(self, remove: bool = False) -> None:
        """Close files, the index and the remote tier (chunks on their way there are sent first,
        for up to ``RemoteConfig.flush_s``); ``remove`` also deletes the extents and the index
        (tests, benchmarks). The shared store keeps its chunks."""
        if getattr(self, "remote", None) is not None:
            self.remote.close()
            self.remote = None
        if self.pool is not None:
            self.pool.close(remove=remove)
            if self.index is not None:
                self.index.close()
            if remove:
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(self.config.index_file + suffix):
                        os.unlink(self.config.index_file + suffix)
            self.pool = self.index = None


_REMOTE_WHY = {
    "corrupt": "its checksum, key or layout failed the check",
    "absent": "evicted since it was listed",
    "size": "a value of another size",
}
