"""An ``LLM`` owns one cache and the prefix pool it opened, and releases them on ``close()``:
no files, fds or threads left; LLMs share a pool by tenant; a pool's keys name the weights."""

import os
import threading

import pytest

from kvdrive.cache.sparse import SparseConfig
from kvdrive.engine.llm import LLM
from kvdrive.engine.sampling import SamplingParams
from kvdrive.errors import KvdriveError
from kvdrive.models.identity import weights_digest
from kvdrive.prefix.pool import PrefixConfig, PrefixPool
from kvdrive.storage.pool import PoolPath
from kvdrive.tiered.config import TieredConfig

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
PROMPT = "The keeper climbed the stairs of the lighthouse every evening to light the lamp. " * 3


def disk_tier(path) -> TieredConfig:
    return TieredConfig(
        SparseConfig(budget=64, sink_tokens=16, window_tokens=32),
        cache_tokens=96,
        disk=(PoolPath(str(path), 64 << 20),),
        host_bytes=30 * 64 * 24576,
        direct="off",
    )


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def extents(path) -> list[str]:
    return [f for f in os.listdir(path) if f.endswith(".extent")]


def test_the_cache_is_built_once_and_close_deletes_the_disk_extents(smollm2, tmp_path):
    """Each generate built a tiered cache with its own extents and never closed it: 200 calls
    left 206 open files and 200 extents."""
    llm = LLM(loaded=smollm2, kv_cache=disk_tier(tmp_path))
    first = llm.generate([PROMPT], GREEDY)[0]
    cache, fds, files = llm._cache, open_fds(), sorted(extents(tmp_path))
    for _ in range(3):
        assert llm.generate([PROMPT], GREEDY)[0].token_ids == first.token_ids
    assert llm._cache is cache and open_fds() == fds and sorted(extents(tmp_path)) == files
    llm.close()
    llm.close()  # twice: nothing happens
    assert os.listdir(tmp_path) == [] and open_fds() < fds
    with pytest.raises(KvdriveError, match="closed"):
        llm.generate([PROMPT], GREEDY)


def test_a_larger_request_rebuilds_the_cache_and_closes_the_old_one(smollm2, tmp_path):
    with LLM(loaded=smollm2, kv_cache=disk_tier(tmp_path)) as llm:
        llm.generate([PROMPT], GREEDY)
        small = llm._cache
        llm.generate([PROMPT, PROMPT + " Again."], GREEDY)
        assert llm._cache is not small and llm._cache.max_seqs == 2
        assert len({f.rsplit("-", 1)[0] for f in extents(tmp_path)}) == 1  # one owner's extents: the old ones went
    assert os.listdir(tmp_path) == []


def test_an_abandoned_stream_frees_its_sequence(smollm2):
    with LLM(loaded=smollm2, max_batch=1) as llm:
        events = llm.stream_events(PROMPT, SamplingParams(max_tokens=8, temperature=0))
        next(events)
        events.close()
        assert llm._cache.seqs.seq_ids() == []
        assert len(llm.generate([PROMPT], GREEDY)[0].token_ids) == 4


def test_llms_sharing_a_pool_with_tenants_give_the_cold_outputs(smollm2, tmp_path):
    """Two LLMs on one directory used to be the way to serve two tenants, and served one
    tenant's KV to the other after a restart. Now a second pool on the directory is refused,
    and LLMs share one pool, each with its tenant."""
    cold = LLM(loaded=smollm2).generate([PROMPT], GREEDY)[0].token_ids
    cfg = PrefixConfig(disks=(PoolPath(str(tmp_path), 32 << 20),), chunk_tokens=16, admit_after=1)
    pool = PrefixPool(smollm2.config, smollm2.model.dtype, cfg, weights=weights_digest(smollm2.model))
    try:
        a, b = LLM(loaded=smollm2, prefix_cache=pool, tenant="a"), LLM(loaded=smollm2, prefix_cache=pool, tenant="b")
        with pytest.raises(KvdriveError, match="in use"):
            LLM(loaded=smollm2, prefix_cache=cfg)
        assert a.generate([PROMPT], GREEDY)[0].token_ids == cold
        assert b.generate([PROMPT], GREEDY)[0].token_ids == cold and pool.last_load.tokens == 0  # not a's chunks
        assert a.generate([PROMPT], GREEDY)[0].token_ids == cold and pool.last_load.tokens >= 16
        assert b.generate([PROMPT], GREEDY)[0].token_ids == cold and pool.last_load.tokens >= 16
        a.close()
        b.close()
        assert pool.pool is not None  # closing a sharer leaves the pool open
    finally:
        pool.close()
    with LLM(loaded=smollm2, prefix_cache=cfg, tenant="a") as again:  # after a restart, a still gets its own
        assert again.generate([PROMPT], GREEDY)[0].token_ids == cold and again.prefix.last_load.tokens >= 16


def test_prefix_keys_name_the_weights_not_a_label(tmp_path):
    """``PrefixConfig.model`` was a free string: KV stored for one set of weights loaded into
    another under the same name."""
    cfg = PrefixConfig(model="same-name", disks=(PoolPath(str(tmp_path), 32 << 20),), chunk_tokens=16, admit_after=1)
    ids = list(range(100, 140))
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    with LLM("random:smollm2-135m", device="cpu", seed=0, prefix_cache=cfg) as llm:
        llm.generate([ids], params)
        assert llm.prefix.lookup(ids).chunks == 2
        digest = llm.prefix.weights
    with LLM("random:smollm2-135m", device="cpu", seed=1, prefix_cache=cfg) as other:
        assert other.prefix.weights != digest and other.prefix.lookup(ids).chunks == 0
        with pytest.raises(KvdriveError, match="other weights"):
            LLM(
                loaded=other.loaded,
                prefix_cache=PrefixPool(
                    other.config, other.model.dtype, PrefixConfig(host_bytes=1 << 20, chunk_tokens=16), weights=digest
                ),
            )
    with LLM("random:smollm2-135m", device="cpu", seed=0, prefix_cache=cfg) as same:
        assert same.prefix.weights == digest and same.prefix.lookup(ids).chunks == 2


def test_prefix_pool_threads_stay_flat_across_calls(smollm2, tmp_path):
    cfg = PrefixConfig(disks=(PoolPath(str(tmp_path), 32 << 20),), chunk_tokens=16, admit_after=1)
    prompts = [f"Story {i}: " + PROMPT for i in range(4)]
    with LLM(loaded=smollm2, prefix_cache=cfg) as llm:
        llm.generate([prompts[0]], GREEDY)
        threads = threading.active_count()
        for p in prompts * 2:
            llm.generate([p], GREEDY)
        assert threading.active_count() == threads
    assert threading.active_count() < threads
