"""Prefix hits on a real model (SmolLM2): the same logits as recomputing, plain and sparse caches."""

import torch

from kvdrive.cache.contiguous import ContiguousKVCache
from kvdrive.cache.sparse import SparseConfig, SparseKVCache
from kvdrive.engine import generation
from kvdrive.engine.sampling import SamplingParams
from kvdrive.prefix.pool import PrefixConfig, PrefixPool
from kvdrive.storage.pool import PoolPath

CHUNK = 16
PROMPT = 75  # 4 full chunks + 11 tokens; a hit covers 64


def prompt_ids(model, n=PROMPT, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()


def prefill(model, cache, seq, ids, start=0, step=None):
    """Prefill ids[start:] in pieces of ``step`` tokens (all at once if None); logits of the last."""
    logits, step = None, step or len(ids)
    for b in range(start, len(ids), step):
        piece = torch.tensor(ids[b : b + step])[None]
        batch = cache.plan([seq], piece.shape[1])
        logits = model(piece, cache, batch)
        cache.commit(batch)
    return logits


def make_pool(tmp_path, model, **kw):
    return PrefixPool(
        model.config,
        model.dtype,
        PrefixConfig(
            model="smollm2",
            disks=(PoolPath(str(tmp_path), 64 << 20),),
            chunk_tokens=CHUNK,
            admit_after=1,
            extent_bytes=8 << 20,
            **kw,
        ),
    )


def test_prefix_hit_gives_the_logits_of_recompute(tmp_path, smollm2):
    model = smollm2.model
    ids = prompt_ids(model)
    cache = ContiguousKVCache(model.config, 3, 128, torch.device("cpu"), model.dtype)
    pool = make_pool(tmp_path, model)
    try:
        with torch.inference_mode():
            cache.add(0, 128)
            full = prefill(model, cache, 0, ids)
            pool.store(cache, 0, ids)
            cache.add(1, 128)
            split = prefill(model, cache, 1, ids, step=64)  # recompute, cut where the hit ends
            cache.add(2, 128)
            done = pool.load(model, cache, 2, ids)
            hit = prefill(model, cache, 2, ids, start=done)
        assert done == 64
        assert torch.equal(hit, split)  # same KV, same computation: bit-identical
        torch.testing.assert_close(hit, full, rtol=1e-4, atol=1e-4)
        assert hit.argmax() == full.argmax()
    finally:
        pool.close(remove=True)


def test_generation_loop_with_prefix_pool_generates_the_same_tokens(tmp_path, smollm2):
    model = smollm2.model
    ids = prompt_ids(model, seed=1)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    def generate(prefix):
        req = generation.Request(0, ids, params, 8)
        cache = ContiguousKVCache(model.config, 1, 128, torch.device("cpu"), model.dtype)
        list(generation.run(model, cache, [req], (), None, prefix=prefix))
        return req.output_ids

    pool = make_pool(tmp_path, model)
    try:
        with torch.inference_mode():
            plain = generate(None)
            assert generate(pool) == plain  # miss, then store
            assert pool.stats().index_chunks == 4
            assert generate(pool) == plain  # hit
        assert pool.stats().hits == 1 and pool.stats().hit_tokens == 64
    finally:
        pool.close(remove=True)


def test_sparse_cache_imports_a_prefix_and_decodes_like_recompute(tmp_path, smollm2):
    model = smollm2.model
    ids = prompt_ids(model, seed=2)
    sparse = SparseConfig(group_tokens=16, budget=32, sink_tokens=16, window_tokens=16)
    pool = make_pool(tmp_path, model)

    def run(load):
        cache = SparseKVCache(model.config, 1, 128, torch.device("cpu"), model.dtype, sparse)
        cache.add(0, 128)
        done = pool.load(model, cache, 0, ids) if load else 0
        logits = prefill(model, cache, 0, ids, start=done, step=64)
        out = [int(logits.argmax())]
        for _ in range(4):  # sparse decode: groups are summarized at the first step
            batch = cache.plan([0], 1)
            logits = model(torch.tensor([[out[-1]]]), cache, batch)
            cache.commit(batch)
            out.append(int(logits.argmax()))
        if not load:
            pool.store(cache, 0, ids)
        return out, logits, cache

    try:
        with torch.inference_mode():
            ref, ref_logits, _ = run(load=False)
            got, got_logits, cache = run(load=True)
        assert pool.last_load.tokens == 64
        assert got == ref and torch.equal(got_logits, ref_logits)
        assert cache.last_selection  # decode really went through top-k selection
    finally:
        pool.close(remove=True)
