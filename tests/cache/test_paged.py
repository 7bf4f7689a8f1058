"""The paged plain cache equals the contiguous cache (chunked prefill, ragged decode, windows,
softcap, static plans over a span), gives its pages back, and admits by pages."""

import pytest
import torch
from factories import decode_steps, graphed_decode, random_prompts, tiny_model

from kvdrive.cache.contiguous import ContiguousKVCache
from kvdrive.cache.paged import PagedKVCache
from kvdrive.cache.pages import PageAllocator
from kvdrive.errors import CapacityError

CPU, F32 = torch.device("cpu"), torch.float32
GEMMA = {
    "head_dim": 16,
    "sliding_window": 24,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "attn_logit_softcapping": 20.0,
}
MODELS = [("llama", {}), ("mistral", {"sliding_window": 20}), ("gemma3_text", GEMMA)]


def _paged(model, max_seqs=3, max_len=400, **kw):
    return PagedKVCache(model.config, max_seqs, max_len, CPU, F32, page_tokens=kw.pop("page_tokens", 16), **kw)


def _chunked_then_ragged_decode(model, cache, chunks=(50, 1, 33, 64)):
    """Two sequences prefilled in chunks (one page boundary per chunk at least), then a ragged
    decode in an order unlike the slots: all logits, concatenated."""
    prompts = random_prompts((sum(chunks), 70))
    out = []
    for i, (p, parts) in enumerate(zip(prompts, (chunks, (70,)))):
        cache.add(i, 400)
        begin = 0
        for n in parts:
            b = cache.plan([i], n)
            out.append(model(torch.tensor([p[begin : begin + n]]), cache, b, all_logits=True)[0])
            cache.commit(b)
            begin += n
    for t in range(20):
        b = cache.plan([1, 0], 1)
        out.append(model(torch.tensor([[7 + t], [3]]), cache, b))
        cache.commit(b)
    return torch.cat(out)


@pytest.mark.parametrize("model_type,extra", MODELS)
def test_paged_equals_contiguous(model_type, extra):
    model = tiny_model(model_type, **extra)
    want = _chunked_then_ragged_decode(model, ContiguousKVCache(model.config, 3, 400, CPU, F32))
    got = _chunked_then_ragged_decode(model, _paged(model))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("span", [256, 400])
def test_a_static_plan_equals_eager_decode(span):
    """The CUDA-graph path plans against a device tensor of lengths and a span of table columns."""
    model = tiny_model("mistral", sliding_window=20)
    cache = _paged(model)
    decode_steps(model, cache, random_prompts((150, 77)), 0)
    step = torch.tensor([[3], [4]])
    eager = model(step, cache, cache.plan([0, 1], 1))
    static_batch = cache.plan([0, 1], 1, start=torch.tensor([150, 77]), span=span)
    assert static_batch.meta.rows.shape == (2, -(-span // 16))
    torch.testing.assert_close(model(step, cache, static_batch), eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type,extra", MODELS)
def test_padded_steps_equal_eager_decode_and_padding_writes_only_the_scratch_page(model_type, extra):
    """The padded plan a kept graph replays: sequences named by table rows (any subset, any
    order) plus pad rows give the eager step's logits, and every page but the scratch one holds
    what eager decode left there."""
    model = tiny_model(model_type, **extra)
    eager, padded = _paged(model, max_seqs=4), _paged(model, max_seqs=4)
    for cache in (eager, padded):
        decode_steps(model, cache, random_prompts((150, 77, 40)), 0)
    for t, seq_ids in enumerate([[2, 0], [1], [0, 1, 2], [2, 0]]):
        ids = torch.tensor([[5 + t + i] for i in range(len(seq_ids))])
        b = eager.plan(seq_ids, 1)
        want = model(ids, eager, b)
        eager.commit(b)
        padded.prepare_replay(seq_ids)
        pad = 4 - len(seq_ids)
        slots = torch.tensor([padded.slot(s) for s in seq_ids] + [padded.pad_slot] * pad)
        start = torch.tensor([padded.length(s) for s in seq_ids] + [0] * pad)
        got = model(torch.cat([ids, torch.zeros(pad, 1, dtype=ids.dtype)]), padded, padded.plan_padded(slots, start))
        padded.commit_decode(seq_ids)
        torch.testing.assert_close(got[: len(seq_ids)], want, rtol=1e-5, atol=1e-5)
    n = eager.pages.num_pages
    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(padded.pool[layer][:n], eager.pool[layer][:n], rtol=1e-5, atol=1e-5)
    assert [padded.length(s) for s in range(3)] == [eager.length(s) for s in range(3)] == [153, 79, 43]


def test_padded_sizes_follow_the_capture_list():
    from kvdrive.engine.cuda_graph import padded_size

    assert [padded_size(n, 64) for n in (1, 2, 3, 5, 8, 9, 17, 64)] == [1, 2, 4, 8, 8, 16, 24, 64]
    assert padded_size(5, 6) == 6 and padded_size(6, 6) == 6  # never past the batch limit


def test_prepare_replay_takes_the_next_page_in_place():
    model = tiny_model()
    cache = _paged(model)
    decode_steps(model, cache, random_prompts((32,)), 0)  # exactly two pages
    table = cache.table
    assert len(cache.pages.pages(0)) == 2
    cache.prepare_replay([0])
    assert cache.table is table and len(cache.pages.pages(0)) == 3
    assert int(cache.table[cache.seqs.slot(0), 2]) == cache.pages.pages(0)[2]


def test_export_kv_equals_contiguous():
    model = tiny_model()
    prompts = random_prompts((150, 77))
    caches = [ContiguousKVCache(model.config, 2, 400, CPU, F32), _paged(model)]
    for c in caches:
        decode_steps(model, c, prompts, 3)
    for layer, (start, stop) in ((0, (0, 80)), (2, (17, 33)), (1, (48, 64)), (1, (70, 80))):
        for seq in (0, 1):
            want, got = caches[0].export_kv(seq, layer, start, stop), caches[1].export_kv(seq, layer, start, stop)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # layers past 0: attention rounds apart


def test_pages_are_reserved_on_add_taken_as_the_sequence_grows_and_freed():
    model = tiny_model()
    cache = _paged(model, max_seqs=4, pool_tokens=160)  # 10 pages of 16
    assert cache.token_capacity == 160 and cache.can_add(160) and not cache.can_add(161)
    cache.add(0, 100)  # 7 pages promised
    assert cache.pages.num_held == 0 and not cache.can_add(64) and cache.can_add(48)
    with pytest.raises(CapacityError):
        cache.add(1, 64)
    assert 1 not in cache.seqs  # a refused add takes no slot
    b = cache.plan([0], 40)
    model(torch.randint(0, 300, (1, 40)), cache, b)
    cache.commit(b)
    used, capacity = cache.tier_bytes()["gpu"]
    assert cache.pages.num_held == 3 and used == 3 * cache.page_bytes and capacity == 10 * cache.page_bytes
    cache.free(0)
    assert cache.pages.num_held == 0 and cache.can_add(160)


def test_allocator_grows_past_a_reservation_only_into_pages_nobody_was_promised():
    pages = PageAllocator(4, 8)
    pages.add(0, 8)  # one page
    pages.add(1, 16)  # two pages
    assert pages.num_available == 1
    assert pages.grow(0, 16) == [0, 1]  # its promised page and the free one, lowest ids first
    assert pages.num_available == 0 and pages.grow(0, 16) == []
    with pytest.raises(CapacityError):
        pages.grow(0, 17)
    assert pages.grow(1, 16) == [2, 3]  # the promise to sequence 1 was kept
    pages.free(0)
    pages.free(1)
    assert pages.num_available == 4 and pages.num_held == 0


def test_engine_admits_by_pages():
    """A pool for about one request: the second waits until the first frees its pages, and both
    give the tokens they give alone."""
    from kvdrive.engine.core import Engine
    from kvdrive.engine.request import Request
    from kvdrive.engine.sampling import SamplingParams

    model = tiny_model()
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = random_prompts((60, 50))

    def run(cache):
        engine = Engine(model, cache, (), tokenizer=None)
        reqs = [Request(i, p, params, 6, None) for i, p in enumerate(prompts)]
        for r in reqs:
            engine.add_request(r)
        most = 0
        while engine.has_unfinished():
            engine.step()
            most = max(most, len(engine.sched.running) + (engine.sched.prefilling is not None))
        return [r.output_ids for r in reqs], most

    tight, most_tight = run(_paged(model, max_seqs=2, pool_tokens=80))  # 5 pages: 66 tokens take all of them
    wide, most_wide = run(_paged(model, max_seqs=2))
    assert tight == wide and (most_tight, most_wide) == (1, 2)
    with pytest.raises(CapacityError):
        Engine(model, _paged(model, max_seqs=2, pool_tokens=48), (), None).add_request(
            Request(9, prompts[0], params, 6, None)
        )


@pytest.mark.gpu
@pytest.mark.parametrize("model_type,extra", MODELS)
def test_graphed_paged_decode_equals_contiguous_on_gpu(model_type, extra):
    """bf16 on the GPU: the split-KV kernel under a captured graph, pages taken between replays
    and the span crossing its first power of two, against the contiguous cache's eager decode.
    Tolerance as for the sparse kernel against the same reference (tests/cache/test_gpu.py):
    bf16 operands summed in another order, 2e-2 relative in norm."""
    model = tiny_model(model_type, **extra).to("cuda", torch.bfloat16)
    dev = torch.device("cuda")
    prompts = random_prompts((150, 77, 240))
    ref = ContiguousKVCache(model.config, 3, 400, dev, torch.bfloat16)
    want = decode_steps(model, ref, prompts, 24).float()
    paged = PagedKVCache(model.config, 3, 400, dev, torch.bfloat16, page_tokens=64)
    decode_steps(model, paged, prompts, 0)
    got = graphed_decode(model, paged, 3, 24).float()
    assert float((got - want).norm() / want.norm()) < 2e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
