"""Deferred disk misses (``TieredConfig.disk_misses="defer"``): a decode step serves what the GPU
cache and the host arena hold and leaves disk-only groups for later steps, with no host sync
inside the step. With an arena that holds everything it is exact; with a small one the groups
left out are read behind and served later; a failed read is lost, never served."""

import numpy as np
import pytest
import torch
from factories import CPU, F32, Done
from factories import decode_steps as _decode
from factories import disk_config as _disk_cfg
from factories import random_prompts as _prompts
from factories import tiny_model as _tiny

from kvdrive.cache.sparse import SparseConfig, SparseKVCache
from kvdrive.errors import KvdriveError
from kvdrive.tiered.cache import TieredConfig, TieredSparseKVCache

SPARSE = SparseConfig(group_tokens=8, budget=48, sink_tokens=8, window_tokens=16)


def _no_sync_resolve(cache):
    """Fail the test if a decode step waits for a disk read (the wait path). Summaries of groups
    that just filled still go through ``resolve``; those groups are in host memory."""
    host, real = cache.host, cache.host.resolve

    def resolve(layer, slot_list, groups, need, keep=None):
        s = np.asarray(slot_list)[:, None].repeat(groups.shape[1], 1)
        assert (host.index.slot_of[layer, s, groups][need.astype(bool)] >= 0).all(), "a step waited for the disk"
        return real(layer, slot_list, groups, need, keep)

    host.resolve = resolve


def test_an_arena_that_holds_everything_is_exact(tmp_path):
    model, prompts = _tiny(), _prompts()
    ref = _decode(model, SparseKVCache(model.config, 3, 400, CPU, F32, SPARSE), prompts, 12)
    cache = TieredSparseKVCache(
        model.config, 3, 400, CPU, F32, _disk_cfg(tmp_path, SPARSE, 200, cache_tokens=48, disk_misses="defer")
    )
    _decode(model, cache, prompts, 0)
    _no_sync_resolve(cache)
    got = []
    for t in range(12):
        b = cache.plan([0, 1, 2], 1)
        got.append(model(torch.full((3, 1), 7 + t), cache, b))
        cache.commit(b)
    torch.testing.assert_close(torch.stack(got, 1), ref, rtol=1e-5, atol=1e-5)
    st = cache.stats()
    assert st["deferred"] == 0 and st["disk_reads"] == 0 and st["disk_writes"] > 0


def test_groups_left_out_are_read_behind_and_served_later(tmp_path):
    """A 40-group arena per layer for ~60 groups per layer: steps leave disk-only groups out,
    never wait for the disk, and the reads behind them land in the arena holding the bytes the
    exact (wait) path holds; until a step leaves a group out, decoding matches the wait path."""
    model, prompts = _tiny(), _prompts()
    (tmp_path / "w").mkdir()
    (tmp_path / "d").mkdir()
    exact = TieredSparseKVCache(model.config, 3, 400, CPU, F32, _disk_cfg(tmp_path / "w", SPARSE, 40, cache_tokens=48))
    cache = TieredSparseKVCache(
        model.config, 3, 400, CPU, F32, _disk_cfg(tmp_path / "d", SPARSE, 40, cache_tokens=48, disk_misses="defer")
    )
    assert cache.defer and not exact.defer
    _decode(model, exact, prompts, 0)
    _decode(model, cache, prompts, 0)
    _no_sync_resolve(cache)
    diverged, matched = False, 0
    for t in range(16):
        ids = torch.full((3, 1), 7 + t)
        b, e = cache.plan([0, 1, 2], 1), exact.plan([0, 1, 2], 1)
        got, want = model(ids, cache, b), model(ids, exact, e)
        cache.commit(b)
        exact.commit(e)
        assert torch.isfinite(got).all()
        for c in (cache, exact):  # the GPU's map of arena rows, updated in one batch per call, is the host's
            assert torch.equal(c.host.slot_gpu, torch.from_numpy(c.host.index.slot_of))
        diverged |= bool((cache.host.deferred._selections[-1][3].numpy() & 2).any())  # this step left groups out
        if not diverged:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            matched += 1
    st = cache.stats()
    assert st["deferred"] > 0 and st["deferred_reads"] > 0 and st["lost"] == 0 and st["disk_reads"] == 0
    assert diverged and matched < 16
    host, ref = cache.host, exact.host
    host.drain()
    checked = 0
    for layer in range(3):  # the prompts' groups read back hold the bytes the exact cache holds
        for s_, p in enumerate(prompts):
            for g in range(len(p) // 8):
                a, b = host.index.slot_of[layer, s_, g], ref.index.slot_of[layer, s_, g]
                if a >= 0 and b >= 0:
                    assert torch.equal(host.arenas[layer].rows[a], ref.arenas[layer].rows[b])
                    checked += 1
    assert checked > 0
    cache.close()
    exact.close()


def test_failed_deferred_reads_are_lost_not_served(tmp_path):
    from kvdrive.storage.io_engine import InjectedFaults

    model, prompts = _tiny(), _prompts()
    cache = TieredSparseKVCache(
        model.config, 3, 400, CPU, F32, _disk_cfg(tmp_path, SPARSE, 40, cache_tokens=48, disk_misses="defer")
    )
    _decode(model, cache, prompts, 2)
    cache.host.drain()  # the reads behind the healthy steps landed
    cache.reset_stats()
    faults = InjectedFaults().fail("read", times=-1)
    for dev in cache.host.pool.devices:
        dev.faults = faults
    for t in range(8):
        b = cache.plan([0, 1, 2], 1)
        assert torch.isfinite(model(torch.full((3, 1), 9 + t), cache, b)).all()
        cache.commit(b)
    cache.host.drain()
    st = cache.stats()
    assert faults.fired > 0 and st["lost"] > 0 and st["deferred_reads"] == 0
    lost = np.argwhere(cache.host.index.disk_at[:, :, 1] < 0)
    assert len(lost)  # their disk copies are forgotten: never read (or served) again


def test_evicted_slots_wait_for_the_step_that_may_read_them(tmp_path):
    """An arena slot evicted while a step is in flight is not handed out again until that step's
    event completes (its copy kernels may still read the old group)."""
    from kvdrive.storage.layout import GroupLayout
    from kvdrive.storage.pool import PoolPath
    from kvdrive.tiered.disk_host_kv import DiskBackedHostKV

    class Pending:
        done = False

        def query(self):
            return self.done

        def synchronize(self):
            self.done = True

    layout, n = GroupLayout(1, 1, 8, F32, 4), 8
    kv = DiskBackedHostKV(layout, 1, n, CPU, 4 * layout.slot_bytes, (PoolPath(str(tmp_path), 1 << 20),))
    for first in range(0, 16, 4):  # groups 0-3 fill the arena, each durable on disk
        kv.begin([0], (first,), 4)
        kv.end([0], (first,), 4, kv._last_step)
        kv._reap(wait_all=True)
    step = Pending()
    kv._last_step = step  # a step in flight
    assert kv.index.num_free(0) == 0
    assert kv.alloc(0, 1, set(), wait=False) == []  # evicts one, but may not reuse it yet
    assert kv.counts["host_evictions"] == 1 and kv.index.num_free(0) == 0
    step.done = True
    assert len(kv.alloc(0, 1, set(), wait=False)) == 1  # the step ended: the slot is free again
    kv.close()


def test_disk_misses_is_checked():
    with pytest.raises(KvdriveError, match="disk_misses"):
        TieredConfig(SPARSE, disk_misses="skip")


@pytest.mark.gpu
@pytest.mark.parametrize("arena_groups", [200, 40])
def test_gpu_graphed_deferred_disk_decode(tmp_path, arena_groups):
    """A disk tier with deferred misses decodes as a CUDA graph: with an arena that holds
    everything it matches the host-only tier's eager decode; with a small one it runs, reads
    behind, and loses nothing."""
    from factories import graphed_decode

    model = _tiny().to("cuda", torch.bfloat16)
    prompts, dev, bf = _prompts(), torch.device("cuda"), torch.bfloat16
    cfg = _disk_cfg(
        tmp_path, SPARSE, arena_groups, cache_tokens=48, disk_misses="defer", micro_batches=2, rebalance_after=5
    )
    cache = TieredSparseKVCache(model.config, 3, 400, dev, bf, cfg)
    assert cache.supports_cuda_graphs
    eager = _decode(
        model,
        TieredSparseKVCache(
            model.config, 3, 400, dev, bf, TieredConfig(SPARSE, cache_tokens=48, micro_batches=2, rebalance_after=5)
        ),
        prompts,
        16,
    )
    _decode(model, cache, prompts, 0)
    written = cache.stats()["disk_writes"]
    out = graphed_decode(model, cache, 3, 16)
    cache.host.drain()
    st = cache.stats()
    assert torch.isfinite(out).all() and st["lost"] == 0
    assert st["disk_writes"] - written >= 3 * 3  # each sequence filled a group in 16 steps: written behind
    if arena_groups == 200:
        torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)
        assert st["deferred"] == 0
    else:
        assert st["deferred"] > 0 and st["deferred_reads"] > 0
    cache.close()


def test_queued_map_changes_keep_the_last_value_of_each_group(tmp_path):
    """``slot_gpu`` changes are applied in one scatter per call; a group evicted and mapped again
    (or mapped twice) in one call ends with its last value, whatever order a scatter of duplicate
    indices would pick."""
    from kvdrive.storage.layout import GroupLayout
    from kvdrive.storage.pool import PoolPath
    from kvdrive.tiered.disk_host_kv import DiskBackedHostKV

    layout = GroupLayout(2, 1, 8, F32, 4)
    kv = DiskBackedHostKV(layout, 2, 8, CPU, 16 * layout.slot_bytes, (PoolPath(str(tmp_path), 1 << 20),))
    index = kv.index
    index.map(1, np.array([3, 9]), [5, 6])  # seq 0 group 3, seq 1 group 1
    index.evict(1, np.array([5]), Done())  # evicted ...
    index.map(1, np.array([3]), [7])  # ... and mapped again, all in one call
    index.map(np.array([0, 0]), np.array([2, 2]), [1, 4])  # the same group twice: the second wins
    kv._flush()
    assert kv.slot_gpu[1, 0, 3] == 7 and kv.slot_gpu[1, 1, 1] == 6 and kv.slot_gpu[0, 0, 2] == 4
    assert torch.equal(kv.slot_gpu, torch.from_numpy(index.slot_of)) and index.take_changes() is None
    kv.close()
