"""The online engine on a tiny random decoder: chunked prefill interleaved with decode under the
step budget, admission bounded by the cache, abort freeing KV at once, every cache kind."""

import asyncio

import pytest
from factories import CPU, F32, disk_config, random_prompts, tiny_model

from kvdrive.cache.contiguous import ContiguousKVCache
from kvdrive.cache.sparse import SparseConfig
from kvdrive.engine.async_engine import AsyncEngine, QueueFull
from kvdrive.engine.core import Engine
from kvdrive.engine.request import Request
from kvdrive.engine.sampling import SamplingParams
from kvdrive.engine.scheduler import MIN_CHUNK, PREFILL_FLOOR, Scheduler
from kvdrive.errors import CapacityError
from kvdrive.models.flops import ChunkCost
from kvdrive.tiered.cache import TieredSparseKVCache
from kvdrive.tiered.config import TieredConfig

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SPARSE = SparseConfig(group_tokens=8, budget=48, sink_tokens=8, window_tokens=16)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def plain(model, seqs=4, max_len=700):
    return ContiguousKVCache(model.config, seqs, max_len, CPU, F32)


def requests(prompts, params=GREEDY, first_id=0):
    return [Request(first_id + i, p, params, params.max_tokens) for i, p in enumerate(prompts)]


def run_all(engine, reqs) -> list[list]:
    """Step until every request finished; returns each step's events."""
    for r in reqs:
        engine.add_request(r)
    steps = []
    while engine.has_unfinished():
        steps.append(engine.step())
    return steps


def alone(model, make_cache, prompt, params=GREEDY) -> list[int]:
    req, cache = requests([prompt], params)[0], make_cache()
    try:
        run_all(Engine(model, cache, (), None), [req])
    finally:
        cache.close()
    return req.output_ids


def test_a_long_prompt_is_prefilled_across_steps_while_the_others_decode(model):
    short, long_ = random_prompts((20, 31, 600), seed=3)[:2], random_prompts((600,), seed=4)[0]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    engine = Engine(model, plain(model), (), None, step_tokens=100, prefill_chunk=256)
    running = requests(short, params)
    for r in running:
        engine.add_request(r)
    engine.step()  # both short prompts prefilled in the first step
    assert engine.num_running == 2
    late = requests([long_], params, first_id=2)[0]
    engine.add_request(late)
    cost, chunks = ChunkCost(model.config), []
    while late.prefilled < len(long_):
        before = late.prefilled
        events = engine.step()
        chunks.append(late.prefilled - before)
        assert sorted(e.seq_id for e in events if e.seq_id < 2) == [0, 1]  # every stream got its token
        assert cost(before, chunks[-1]) <= 100 - 2  # the budget: 100 tokens' work less the 2 decoding
        assert cost(before, chunks[-1] + 1) > 100 - 2 or late.prefilled == len(long_)  # and all of it
    # deeper chunks attend to a longer prefix, so they are shorter: every step does the same work
    assert chunks[-2] < chunks[0] < 98 and chunks == sorted(chunks[:-1], reverse=True) + chunks[-1:]
    while engine.has_unfinished():
        engine.step()
    for r, p in zip(running + [late], short + [long_]):
        assert r.output_ids == alone(model, lambda: plain(model), p, params)


def test_the_prefill_floor_lets_prompts_in_when_the_batch_fills_the_budget():
    sched = Scheduler(max_batch=64, step_tokens=8, prefill_chunk=512)
    sched.running = [object()] * 40
    assert sched.prefill_quota() == PREFILL_FLOOR
    assert Scheduler(4, None, 512).prefill_quota() is None


def test_a_chunk_deep_in_a_long_prompt_costs_its_attention_too():
    """Under a budget, a chunk costs its FLOPs in tokens of a prompt's start: at position 130K
    of the Llama-3.2-1B shape a token costs ~9, so a step's chunk is ~9x shorter there; the
    step's first chunk keeps MIN_CHUNK tokens however deep."""
    from kvdrive.models.presets import hf_config
    from kvdrive.models.registry import from_hf_config

    cfg = from_hf_config(hf_config("llama-3.2-1b"))
    cost = ChunkCost(cfg)
    assert cost(0, 256) == pytest.approx(256, rel=0.01)
    assert 8 < cost(130_000, 1) < 10
    sched = Scheduler(8, 256, 2048, cost)
    req = Request(0, [1] * 140_000, GREEDY, 4)
    assert 250 < sched.chunk(req, 256) < 256  # the start of a prompt attends little
    req.prefilled = 130_000
    deep = sched.chunk(req, 256)
    assert 25 < deep < 32 and cost(130_000, deep) <= 256 < cost(130_000, deep + 1)
    assert sched.chunk(req, 40) == MIN_CHUNK and sched.chunk(req, 40, first=False) == 4
    assert Scheduler(8, 256, 2048).chunk(req, 256) == 256  # no cost model: a chunk costs its length


def test_admission_never_registers_more_sequences_than_the_cache_holds(model):
    prompts = random_prompts((30, 40, 50, 60, 70), seed=5)
    cache = plain(model, seqs=2)
    engine = Engine(model, cache, (), None, step_tokens=256)
    reqs = requests(prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    for r in reqs:
        engine.add_request(r)
    most = 0
    while engine.has_unfinished():
        engine.step()
        most = max(most, cache.max_seqs - cache.seqs.num_free)
    assert most == 2 and cache.seqs.num_free == 2
    assert all(len(r.output_ids) == 5 and r.finish_reason == "length" for r in reqs)


def test_a_request_the_cache_could_never_hold_is_refused_when_added(model):
    engine = Engine(model, plain(model, max_len=64), (), None)
    with pytest.raises(CapacityError, match="lower max_tokens"):
        engine.add_request(Request(0, [1] * 60, GREEDY, 12))
    assert not engine.has_unfinished()


def test_abort_frees_the_kv_at_once_wherever_the_request_is(model):
    cache = plain(model, seqs=2)
    engine = Engine(model, cache, (), None, step_tokens=40, prefill_chunk=32, max_batch=2)
    running, prefilling, waiting = requests(
        random_prompts((20, 300, 10), seed=6), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    )
    for r in (running, prefilling, waiting):
        engine.add_request(r)
    engine.step()
    engine.step()
    assert engine.sched.running == [running] and engine.sched.prefilling is prefilling
    assert list(engine.sched.waiting) == [waiting] and cache.seqs.num_free == 0
    assert engine.abort(prefilling.seq_id) is prefilling and cache.seqs.num_free == 1
    assert engine.abort(waiting.seq_id) is waiting and cache.seqs.num_free == 1
    assert engine.abort(running.seq_id) is running and cache.seqs.num_free == 2
    assert {r.finish_reason for r in (running, prefilling, waiting)} == {"abort"}
    assert engine.abort(running.seq_id) is None and not engine.has_unfinished()
    assert cache.seqs.tokens() == 0 and engine.counters.finished["abort"] == 3


def tiered_host(model):
    return TieredSparseKVCache(model.config, 3, 700, CPU, F32, TieredConfig(SPARSE, cache_tokens=64, rebalance_after=5))


@pytest.mark.parametrize("kind", ["plain", "tiered_host", "tiered_disk"])
def test_interleaved_prefill_gives_each_request_its_tokens_alone(model, kind, tmp_path):
    """Prompts arriving while others decode, prefilled in small chunks between decode steps: each
    request's greedy tokens are those of its run alone, on every cache kind."""
    dirs = iter(range(10))

    def make():
        if kind == "plain":
            return plain(model, seqs=3)
        if kind == "tiered_host":
            return tiered_host(model)
        path = tmp_path / str(next(dirs))
        path.mkdir()
        return TieredSparseKVCache(model.config, 3, 700, CPU, F32, disk_config(path, SPARSE, 45, cache_tokens=64))

    prompts = random_prompts((150, 77, 203), seed=7)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    cache = make()
    try:
        engine = Engine(model, cache, (), None, step_tokens=40, prefill_chunk=24)
        reqs = requests(prompts, params)
        engine.add_request(reqs[0])
        for _ in range(8):
            engine.step()
        for r in reqs[1:]:
            engine.add_request(r)
        while engine.has_unfinished():
            engine.step()
        if kind == "tiered_disk":  # the arena holds less than the three sequences: groups went to disk and back
            assert cache.stats()["disk_writes"] > 0 and cache.stats()["disk_reads"] > 0
    finally:
        cache.close()
    for r, p in zip(reqs, prompts):
        want = alone(model, make, p, params)
        assert r.output_ids == want


def test_async_engine_streams_aborts_and_bounds_its_queue(model):
    prompts = random_prompts((25, 35, 45), seed=8)
    cache = plain(model, seqs=1)

    async def main():
        engine = AsyncEngine(Engine(model, cache, (), None, step_tokens=64, isolate_errors=True), max_waiting=1)
        try:
            long_params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
            first = engine.submit(Request(0, prompts[0], long_params, 400))
            seen = [await first.__anext__() for _ in range(3)]
            second = engine.submit(Request(1, prompts[1], GREEDY, 12))  # waits: the cache holds one sequence
            with pytest.raises(QueueFull):
                engine.submit(Request(2, prompts[2], GREEDY, 12))
            first.abort()
            rest = [e async for e in first]
            out = [e async for e in second]
            return seen, rest, out, second.req
        finally:
            engine.shutdown()

    seen, rest, out, second = asyncio.run(main())
    assert [e.seq_id for e in seen] == [0, 0, 0] and len(rest) < 397  # stopped well before max_tokens
    assert [e.token_id for e in out] == second.output_ids and out[-1].finish_reason == "length"
    assert second.output_ids == alone(model, lambda: plain(model), prompts[1])
    assert cache.seqs.num_free == 1


def test_async_engine_refuses_a_request_too_long_for_the_cache(model):
    async def main():
        engine = AsyncEngine(Engine(model, plain(model, max_len=64), (), None, isolate_errors=True))
        try:
            stream = engine.submit(Request(0, [1] * 60, GREEDY, 12))
            return [e async for e in stream], stream.req
        finally:
            engine.shutdown()

    events, req = asyncio.run(main())
    assert [e.finish_reason for e in events] == ["error"] and "max_tokens" in req.error


def test_counters_and_snapshot_follow_the_requests(model):
    cache = plain(model, seqs=2)
    engine = Engine(model, cache, (), None)
    reqs = requests(random_prompts((30, 40), seed=9), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    run_all(engine, reqs)
    snap = engine.snapshot()
    c = snap.counters
    assert c.prompt_tokens == 70 and c.computed_prompt_tokens == 70 and c.generation_tokens == 12
    assert c.finished["length"] == 2 and snap.running == snap.waiting == snap.kv_tokens == 0
    assert snap.tiers["gpu"].used == 0 and snap.tiers["gpu"].capacity == cache.nbytes
