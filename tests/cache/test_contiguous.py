"""The plain contiguous cache: chunked prefill, ragged decode and sliding windows are exact."""

import pytest
import torch

from kvdrive.cache.contiguous import ContiguousKVCache, attention_mask
from kvdrive.models.decoder import DecoderLM
from kvdrive.models.registry import from_hf_config


def _tiny(model_type="llama", **extra):
    from transformers import AutoConfig

    cfg = from_hf_config(
        AutoConfig.for_model(
            model_type,
            vocab_size=300,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **extra,
        )
    )
    torch.manual_seed(0)
    return DecoderLM(cfg).eval()


def _logits(model, ids, chunks):
    cache = ContiguousKVCache(model.config, 1, ids.shape[1], torch.device("cpu"), torch.float32)
    cache.add(0, ids.shape[1])
    out, begin = [], 0
    for n in chunks:
        batch = cache.plan([0], n)
        out.append(model(ids[:, begin : begin + n], cache, batch, all_logits=True)[0])
        cache.commit(batch)
        begin += n
    return torch.cat(out)


def test_chunked_prefill_equals_one_pass():
    model = _tiny()
    ids = torch.randint(0, 300, (1, 90))
    whole = _logits(model, ids, [90])
    torch.testing.assert_close(_logits(model, ids, [33, 1, 40, 16]), whole, rtol=1e-5, atol=1e-5)


def test_sliding_window_chunks_equal_one_pass():
    model = _tiny("mistral", sliding_window=20)
    ids = torch.randint(0, 300, (1, 70))
    torch.testing.assert_close(_logits(model, ids, [25, 25, 1, 19]), _logits(model, ids, [70]), rtol=1e-5, atol=1e-5)


def test_ragged_batch_decode_equals_single():
    model = _tiny()
    lens = [7, 31, 18]
    prompts = [torch.randint(0, 300, (1, n)) for n in lens]
    cache = ContiguousKVCache(model.config, 3, 64, torch.device("cpu"), torch.float32)
    for i, p in enumerate(prompts):
        cache.add(i, 64)
        b = cache.plan([i], p.shape[1])
        model(p, cache, b)
        cache.commit(b)
    step = torch.tensor([[5], [6], [7]])
    batch = cache.plan([2, 0, 1], 1)  # order differs from slots: exercises the gather path
    got = model(step[[2, 0, 1]], cache, batch)
    for row, i in enumerate([2, 0, 1]):
        ids = torch.cat([prompts[i], step[i : i + 1]], 1)
        want = _logits(model, ids, [ids.shape[1]])[-1]
        torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5)


def test_mask_semantics():
    m = attention_mask(torch.tensor([3]), 2, 5, window=2)[0, 0]
    # query positions 3 and 4; window 2 keeps keys q-1..q
    assert m.tolist() == [[False, False, True, True, False], [False, False, False, True, True]]


def test_capacity_errors():
    from kvdrive.errors import CapacityError

    model = _tiny()
    cache = ContiguousKVCache(model.config, 1, 16, torch.device("cpu"), torch.float32)
    with pytest.raises(CapacityError):
        cache.add(0, 17)
    cache.add(0, 16)
    with pytest.raises(CapacityError):
        cache.add(1, 4)
    cache.free(0)
    cache.add(1, 4)


def test_static_plan_equals_eager_decode():
    """The CUDA-graph path plans against a device tensor of lengths over the whole
    allocation; on CPU the same code must give the eager logits."""
    model = _tiny("mistral", sliding_window=12)
    cache = ContiguousKVCache(model.config, 2, 40, torch.device("cpu"), torch.float32)
    for i, n in enumerate([9, 23]):
        cache.add(i, 40)
        b = cache.plan([i], n)
        model(torch.randint(0, 300, (1, n)), cache, b)
        cache.commit(b)
    step = torch.tensor([[3], [4]])
    eager = model(step, cache, cache.plan([0, 1], 1))
    static = model(step, cache, cache.plan([0, 1], 1, start=torch.tensor([9, 23])))
    torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("span", [24, 32])
def test_a_static_plan_over_a_span_equals_the_whole_allocation(span):
    """A graphed step may attend to the first ``span`` positions only (every length below it):
    the logits equal those over the whole allocation, the sliding window included."""
    model = _tiny("mistral", sliding_window=12)
    cache = ContiguousKVCache(model.config, 2, 40, torch.device("cpu"), torch.float32)
    for i, n in enumerate([9, 23]):
        cache.add(i, 40)
        b = cache.plan([i], n)
        model(torch.randint(0, 300, (1, n)), cache, b)
        cache.commit(b)
    step, start = torch.tensor([[3], [4]]), torch.tensor([9, 23])
    whole = cache.plan([0, 1], 1, start=start)
    spanned = cache.plan([0, 1], 1, start=start, span=span)
    assert (whole.meta.kv_len, spanned.meta.kv_len) == (40, span)
    torch.testing.assert_close(model(step, cache, spanned), model(step, cache, whole), rtol=1e-5, atol=1e-5)
