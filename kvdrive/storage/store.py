"""The multi-tier KV store: every group of every sequence over GPU, pinned host and disk.

Data path (all batched; per group only dictionary look-ups and index lists):

* ``put``: full groups -> host slots (one copy, GPU -> host when they come from the
  GPU), then write-behind to the disk pool on the write queues. Returns at once.
* ``fetch``: GPU-cache and host hits are copied into the caller's tensor at once on
  the side stream; disk groups are read into host slots (all devices in parallel)
  and copied when the handle is waited on. Failed reads are misses, never data.
* eviction: the host evicts only groups already durable on disk; the GPU cache drops
  groups that have a lower copy and writes the others back to the host.

Invariants: a group lives in the directory while it has at least one copy; a host
slot being written to disk is never evicted; a host slot is reused only after every
copy that read it has finished (``_host_fence``); disk slots of a freed group whose
write is still in flight are released when the write completes.
"""

from __future__ import annotations

from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kvdrive import device as dev
from kvdrive.errors import CapacityError, KvdriveError
from kvdrive.storage.disk import DEFAULT_EXTENT_BYTES, DIRECT_MODES
from kvdrive.storage.gather import METHODS, RowCopier
from kvdrive.storage.gpu import GpuTier
from kvdrive.storage.host import HostTier
from kvdrive.storage.io_engine import IoFaults
from kvdrive.storage.layout import GroupKey, GroupLayout
from kvdrive.storage.metrics import MetricsSnapshot, StoreMetrics, TierUsage
from kvdrive.storage.policy import POLICIES, make_policy
from kvdrive.storage.pool import DiskPool, PoolPath

__all__ = ["KVStore", "StoreConfig", "FetchHandle", "FetchResult", "GroupKey", "PoolPath"]

GPU, HOST, DISK = "gpu", "host", "disk"


@dataclass(frozen=True)
class StoreConfig:
    """Budgets and knobs of one store. Bytes are budgets; each tier rounds down to whole slots."""

    host_bytes: int  # pinned host arena; also the staging area of every disk transfer
    disk: tuple[PoolPath, ...] = ()  # no paths: host-only store (full host -> CapacityError)
    gpu_bytes: int = 0  # GPU slot pool: resident sink/window slots + selection cache
    gpu_cache_fraction: float = 0.5  # share of the GPU pool the selection cache may take
    direct: str = "auto"  # O_DIRECT: auto (probe, warn on refusal) | on (refusal is an error) | off
    read_depth: int = 32  # disk reads in flight per path
    write_depth: int = 4  # disk writes in flight per path (separate queue: never ahead of reads)
    extent_bytes: int = DEFAULT_EXTENT_BYTES
    policy: str = "lru"
    copy_method: str = "auto"  # auto | triton | staging | torch (see kvdrive.storage.gather)
    overlap: bool = True  # copies on a side stream; False runs them on the caller's stream (ablation)

    def __post_init__(self):
        if self.host_bytes <= 0:
            raise KvdriveError("the store needs a host budget > 0 (it stages every disk transfer)")
        if self.gpu_bytes < 0:
            raise KvdriveError(f"gpu_bytes must be >= 0, got {self.gpu_bytes}")
        if self.direct not in DIRECT_MODES:
            raise KvdriveError(f"direct must be one of {DIRECT_MODES}, got {self.direct!r}")
        if self.read_depth <= 0 or self.write_depth <= 0:
            raise KvdriveError("read_depth and write_depth must be positive")
        if self.policy not in POLICIES:
            raise KvdriveError(f"unknown eviction policy {self.policy!r}; known: {', '.join(POLICIES)}")
        if self.copy_method not in METHODS:
            raise KvdriveError(f"copy method must be one of {METHODS}, got {self.copy_method!r}")
        if len({p.path for p in self.disk}) != len(self.disk):
            raise KvdriveError("a disk path is listed twice")


@dataclass(frozen=True)
class FetchResult:
    """``event``: wait on it (``event.wait()`` on your stream) before reading the destination.
    ``misses``: indices into the requested keys whose rows were NOT written (absent, or
    refused by an integrity check); the caller recomputes them."""

    event: object
    misses: tuple[int, ...]
    from_gpu: int
    from_host: int
    from_disk: int


class FetchHandle:
    """A fetch in progress. ``wait()`` must be called once (it may block on disk reads);
    it launches the copies of the disk-sourced groups and returns the ``FetchResult``."""

    def __init__(self, finish):
        self._finish = finish
        self._result: FetchResult | None = None

    def wait(self) -> FetchResult:
        if self._result is None:
            self._result = self._finish()
        return self._result


def _no_count(*_):
    pass


class _Entry:
    """Where one group's copies are. ``writing``: a disk write is in flight; ``dead``: freed meanwhile."""

    __slots__ = ("gpu", "host", "disk", "durable", "writing", "dead")

    def __init__(self):
        self.gpu = -1
        self.host = -1
        self.disk = None
        self.durable = False
        self.writing = False
        self.dead = False

    def empty(self) -> bool:
        return self.gpu < 0 and self.host < 0 and self.disk is None


class KVStore:
    """The store. All public methods run on one engine thread; disk I/O runs on worker
    threads and is reaped here. ``gpu`` is exposed for resident (sink/window) slots."""

    def __init__(self, layout: GroupLayout, config: StoreConfig, device="auto", faults: IoFaults | None = None):
        self.layout = layout
        self.config = config
        self.device = dev.resolve(device)
        self._metrics = StoreMetrics()
        self.host = HostTier(layout, config.host_bytes, pin=self.device.type == "cuda")
        self.gpu = GpuTier(layout, config.gpu_bytes, self.device, config.gpu_cache_fraction)
        self.pool = DiskPool.open(list(config.disk), layout, direct=config.direct, read_depth=config.read_depth,
                                  write_depth=config.write_depth, extent_bytes=config.extent_bytes,
                                  faults=faults, metrics=self._metrics) if config.disk else None
        self._copier = RowCopier(self.device, config.copy_method)
        self._side = dev.new_stream(self.device) if config.overlap else None
        self._host_fence = dev.new_event(self.device)  # recorded after each copy that reads host slots
        self._host_w = self.host.rows.view(torch.int32)  # (S_host, slot_bytes / 4)
        self._gpu_w = self.gpu.rows.view(torch.int32)  # (S_gpu, group_words)
        self._entries: dict[GroupKey, _Entry] = {}
        self._by_seq: dict[int, set[GroupKey]] = defaultdict(set)
        self._host_lru = make_policy(config.policy)
        self._gpu_lru = make_policy(config.policy)
        self._writes: deque = deque()  # (entries, disk addrs, future), oldest first

    # -- public API -------------------------------------------------------------------

    def put(self, keys, groups: torch.Tensor) -> None:
        """Store full groups (N, 2, H_kv, G, D); disk write-behind. A stored key is replaced.
        Raises ``CapacityError`` (nothing stored) if the tiers cannot take them."""
        keys = list(keys)
        words = self.layout.as_words(groups)  # (N, group_words)
        if words.shape[0] != len(keys) or len(set(keys)) != len(keys):
            raise ValueError(f"{len(keys)} keys (must be distinct) for {words.shape[0]} groups")
        self._reap()
        self._drop([k for k in keys if k in self._entries])
        step = self.host.num_slots
        for start in range(0, len(keys), step):
            self._put_chunk(keys[start : start + step], words, list(range(start, min(start + step, len(keys)))))

    def fetch(self, keys, out: torch.Tensor) -> FetchHandle:
        """Copy the groups of ``keys`` into ``out`` (N, 2, H_kv, G, D), any device, as one batch.
        ``out`` must stay alive until the result's event has completed."""
        keys = list(keys)
        words = self.layout.as_words(out)
        if words.shape[0] != len(keys):
            raise ValueError(f"{len(keys)} keys for {words.shape[0]} destination rows")
        return self._fetch(keys, words, list(range(len(keys))))

    def promote(self, keys, tier: str = GPU) -> FetchResult:
        """Bring groups up to ``tier`` ("gpu": the selection cache; "host"). ``misses`` index
        ``keys``; wait on ``event`` before reading promoted GPU slots."""
        if tier not in (GPU, HOST):
            raise KvdriveError(f"promote to 'gpu' or 'host', not {tier!r}")
        keys = list(keys)
        absent = [i for i, k in enumerate(keys) if k not in self._entries]
        level = "host" if tier == HOST else "gpu"
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # duplicates: promote once
        todo = [i for k, i in first.items() if k in self._entries and getattr(self._entries[k], level) < 0]
        todo_keys = [keys[i] for i in todo]
        if tier == HOST:
            res = self._fetch(todo_keys, None, [], count=False).wait()
        else:
            slots = self._gpu_alloc(len(todo), protect=set(todo_keys))
            res = self._fetch(todo_keys, self._gpu_w, slots, count=False).wait()
            missed = set(res.misses)
            for j, (k, s) in enumerate(zip(todo_keys, slots)):
                if j in missed:
                    self.gpu.free([s])
                else:
                    self._entries[k].gpu = s
                    self._gpu_lru.insert([k])
        misses = tuple(sorted(absent + [todo[j] for j in res.misses]))
        return FetchResult(res.event, misses, res.from_gpu, res.from_host, res.from_disk)

    def demote(self, keys, tier: str = HOST) -> int:
        """Drop copies above ``tier`` ("host" or "disk"), writing back what has no lower copy.
        Returns how many groups were demoted; groups with no lower copy stay where they are."""
        if tier not in (HOST, DISK):
            raise KvdriveError(f"demote to 'host' or 'disk', not {tier!r}")
        keys = [k for k in dict.fromkeys(keys) if k in self._entries]
        on_gpu = [k for k in keys if self._entries[k].gpu >= 0]
        self._evict_gpu(on_gpu, protect=set(keys))
        if tier == HOST:
            return len(on_gpu)
        if any(self._entries[k].writing for k in keys):
            self._reap(wait_all=True)
        movable = [k for k in keys if k in self._entries and self._entries[k].durable and self._entries[k].host >= 0]
        self._evict_host(movable)
        return len(movable)

    def free_sequence(self, seq_id: int) -> int:
        """Forget every group and resident GPU slot of ``seq_id``; returns the groups freed."""
        keys = list(self._by_seq.pop(seq_id, ()))
        self._drop(keys)
        self.gpu.release(seq_id)
        return len(keys)

    def where(self, key: GroupKey) -> tuple[str, ...]:
        """Tiers holding ``key`` now (disk only once its write completed)."""
        e = self._entries.get(key)
        if e is None:
            return ()
        return tuple(t for t, has in ((GPU, e.gpu >= 0), (HOST, e.host >= 0), (DISK, e.durable)) if has)

    def flush(self) -> None:
        """Wait for all write-behind to finish."""
        self._reap(wait_all=True)

    def metrics(self) -> MetricsSnapshot:
        cap = {GPU: TierUsage(self.gpu.bytes_used, self.gpu.bytes_capacity),
               HOST: TierUsage(self.host.bytes_used, self.host.bytes_capacity)}
        if self.pool:
            cap[DISK] = TierUsage(self.pool.bytes_used(), self.pool.bytes_capacity(), self.pool.physical_bytes())
        return self._metrics.snapshot(cap)

    def close(self) -> None:
        self.flush()
        if self.pool:
            self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- data movement ----------------------------------------------------------------

    @contextmanager
    def _on_side(self):
        if self._side is None:
            yield
            return
        self._side.wait_stream(dev.current_stream(self.device))
        with dev.use_stream(self._side):
            yield

    def _copy(self, src, src_idx, dst, dst_idx) -> None:
        """One batched row copy on the side stream; fences host slots it reads."""
        if not src_idx:
            return
        with self._on_side():
            self._copier.copy(src, src_idx, dst, dst_idx, self.layout.group_words)
            if src is self._host_w:
                self._host_fence = dev.new_event(self.device)
                self._host_fence.record()

    def _put_chunk(self, keys, words, rows) -> None:
        n = len(keys)
        addrs = self.pool.alloc(n) if self.pool else None
        try:
            slots = self._host_alloc(n, protect=frozenset())
        except CapacityError:
            if addrs:
                self.pool.free(addrs)
            raise
        self._copy(words, rows, self._host_w, slots)
        from_gpu = words.device.type == "cuda"
        done = dev.new_event(self.device)
        if from_gpu:
            with self._on_side():
                done.record()
            done.wait(dev.current_stream(self.device))  # the caller may overwrite ``groups`` after us
            self._metrics.moved("gpu->host", n * self.layout.group_bytes, n)
        entries = []
        for i, k in enumerate(keys):
            e = self._entries[k] = _Entry()
            e.host = slots[i]
            self._by_seq[k.seq_id].add(k)
            entries.append(e)
        self._host_lru.insert(keys)
        if self.pool:
            for e, a in zip(entries, addrs):
                e.disk, e.writing = a, True
            fut = self.pool.write(addrs, [self.host.buffer(s) for s in slots],
                                  before=done.synchronize if from_gpu else None)
            self._writes.append((entries, addrs, fut))

    def _fetch(self, keys, dst, dst_idx, count: bool = True) -> FetchHandle:
        """Copy ``keys`` into rows ``dst_idx`` of ``dst`` (int32 words), or only stage them in host if
        ``dst`` is None. ``count``: record hits and misses (a caller's request, not a promotion)."""
        hits = self._metrics.hit if count else _no_count
        missed = self._metrics.miss if count else _no_count
        self._reap()
        src = {GPU: ([], []), HOST: ([], [])}  # tier -> (slots, request indices)
        (g_slots, g_rows), (h_slots, h_rows) = src[GPU], src[HOST]
        disk_keys, disk_rows, misses = [], [], []
        get, to_gpu = self._entries.get, dst is not None
        for i, k in enumerate(keys):  # NOTE: the only per-group Python work of a fetch
            e = get(k)
            if e is None:
                misses.append(i)
            elif to_gpu and e.gpu >= 0:
                g_slots.append(e.gpu)
                g_rows.append(i)
            elif e.host >= 0:
                h_slots.append(e.host)
                h_rows.append(i)
            elif e.durable:
                disk_keys.append(k)
                disk_rows.append(i)
            else:
                misses.append(i)
        missed("absent", len(misses))
        self._gpu_lru.touch([keys[i] for i in src[GPU][1]])
        self._host_lru.touch([keys[i] for i in src[HOST][1]])
        if dst is not None:
            gb = self.layout.group_bytes
            for tier, tier_w, direction in ((GPU, self._gpu_w, "gpu->gpu"), (HOST, self._host_w, "host->gpu")):
                slot_list, rows = src[tier]
                self._copy(tier_w, slot_list, dst, [dst_idx[i] for i in rows])
                self._metrics.moved(direction, gb * len(rows), len(rows))
        hits(GPU, len(src[GPU][1]))
        hits(HOST, len(src[HOST][1]))
        # Staging after the hit copies were issued: their slots may be evicted now (the fence
        # in _host_alloc makes reuse wait for those copies). More disk groups than host slots
        # go in rounds of one host-full each; the first round is in flight when we return.
        step = max(1, self.host.num_slots)
        rounds = [(disk_keys[i : i + step], disk_rows[i : i + step]) for i in range(0, len(disk_keys), step)]
        first = self._stage(rounds[0][0]) if rounds else None

        def finish() -> FetchResult:
            from_disk = 0
            for r, (ks, rows) in enumerate(rounds):
                slots, pending = first if r == 0 else self._stage(ks)
                ok_slots, ok_rows = self._land(ks, rows, slots, pending.result(), misses, missed)
                if dst is not None:
                    self._copy(self._host_w, ok_slots, dst, [dst_idx[i] for i in ok_rows])
                    self._metrics.moved("host->gpu", self.layout.group_bytes * len(ok_rows), len(ok_rows))
                from_disk += len(ok_rows)
            hits(DISK, from_disk)
            event = dev.new_event(self.device)
            with self._on_side():
                event.record()
            return FetchResult(event, tuple(sorted(misses)), len(src[GPU][1]), len(src[HOST][1]), from_disk)

        return FetchHandle(finish)

    def _stage(self, keys):
        """Host slots for ``keys`` and their disk reads, all devices at once."""
        slots = self._host_alloc(len(keys), protect=frozenset())
        return slots, self.pool.read([self._entries[k].disk for k in keys], [self.host.buffer(s) for s in slots])

    def _land(self, keys, rows, slots, results, misses, missed):
        """Adopt read slots as host copies; failed reads become misses and lose their disk copy.
        Returns (slots, rows) to copy to the destination."""
        ok_slots, ok_rows, spare, failed = [], [], [], []
        for k, i, s, r in zip(keys, rows, slots, results):
            e = self._entries.get(k)
            if r is not None or e is None:
                missed(r or "absent")
                misses.append(i)
                spare.append(s)
                if e is not None:
                    failed.append(k)
                continue
            if e.host < 0:
                e.host = s
                self._host_lru.insert([k])
            else:
                spare.append(s)  # a duplicate key in this fetch: copy from this slot, then free it
            ok_slots.append(s), ok_rows.append(i)
        self._drop_disk_copies(failed)
        self.host.free(spare)  # reused only after the fence of the copy below
        return ok_slots, ok_rows

    # -- capacity ---------------------------------------------------------------------

    def _host_alloc(self, n: int, protect) -> list[int]:
        """``n`` host slots, evicting durable groups (LRU first) and waiting for write-behind
        (back-pressure) as needed; ``CapacityError`` if impossible."""
        if n > self.host.num_slots:
            raise CapacityError(f"{n} groups need {n} host slots at once; the host tier has "
                                f"{self.host.num_slots}: raise host_bytes or move fewer groups per call")
        while self.host.num_free < n:
            victims = self._host_lru.victims(n - self.host.num_free,
                                             lambda k: k not in protect and self._entries[k].durable)
            self._evict_host(victims)
            if self.host.num_free >= n:
                break
            if not self._writes:
                raise CapacityError(f"host tier full: {n} slots needed, {self.host.num_free} free, and no group "
                                    f"can leave (none has a disk copy{'' if self.pool else '; no disk path'})")
            self._reap(wait_one=True)
        self._host_fence.synchronize()  # a freed slot may still be read by an in-flight copy
        return self.host.alloc(n)

    def _gpu_alloc(self, n: int, protect) -> list[int]:
        while self.gpu.cache_free < n:
            victims = self._gpu_lru.victims(n - self.gpu.cache_free, lambda k: k not in protect)
            if not victims:
                raise CapacityError(f"GPU selection cache: {n} slots needed, {self.gpu.cache_free} free of "
                                    f"{self.gpu.cache_slots_max}")
            self._evict_gpu(victims, protect)
        return self.gpu.alloc(n)

    def _evict_gpu(self, keys, protect) -> None:
        """Drop GPU copies; groups with no other copy are written back to the host first."""
        back = [k for k in keys if self._entries[k].host < 0 and not self._entries[k].disk]
        if back:
            slots = self._host_alloc(len(back), protect=protect | set(back))
            self._copy(self._gpu_w, [self._entries[k].gpu for k in back], self._host_w, slots)
            self._metrics.moved("gpu->host", len(back) * self.layout.group_bytes, len(back))
            for k, s in zip(back, slots):
                self._entries[k].host = s
            self._host_lru.insert(back)
        self.gpu.free([self._entries[k].gpu for k in keys])
        for k in keys:
            self._entries[k].gpu = -1
        self._gpu_lru.remove(keys)

    def _evict_host(self, keys) -> None:
        self.host.free([self._entries[k].host for k in keys])
        for k in keys:
            self._entries[k].host = -1
        self._host_lru.remove(keys)

    def _drop(self, keys) -> None:
        """Forget groups everywhere; disk slots with a write in flight are freed by ``_reap``."""
        for k in keys:
            e = self._entries.pop(k)
            self._by_seq[k.seq_id].discard(k)
            if e.gpu >= 0:
                self.gpu.free([e.gpu])
            if e.host >= 0:
                self.host.free([e.host])
            if e.writing:
                e.dead = True
            elif e.disk is not None:
                self.pool.free([e.disk])
        self._gpu_lru.remove(keys)
        self._host_lru.remove(keys)

    def _drop_disk_copies(self, keys) -> None:
        """A disk copy failed its read: never read it again; forget groups left with no copy."""
        for k in keys:
            e = self._entries[k]
            self.pool.free([e.disk])
            e.disk, e.durable = None, False
            if e.empty():
                del self._entries[k]
                self._by_seq[k.seq_id].discard(k)

    def _reap(self, wait_all: bool = False, wait_one: bool = False) -> None:
        """Retire finished disk writes (oldest first): mark durable, or release a failed slot."""
        while self._writes:
            entries, addrs, fut = self._writes[0]
            if not (wait_all or wait_one or fut.done()):
                return
            results = fut.result()
            self._writes.popleft()
            wait_one = False
            release = []
            for e, a, r in zip(entries, addrs, results):
                e.writing = False
                if e.dead or r is not None:
                    release.append(a)
                    e.disk = None
                else:
                    e.durable = True
            if release:
                self.pool.free(release)
