"""The tiered cache's prefill: with the prompt's KV kept on the GPU while it is prefilled (the
stage), chunks attend with no host traffic and the same numbers as gathering from host."""

import pytest
import torch
from factories import CPU, F32
from factories import random_prompts as _prompts
from factories import tiny_model as _tiny

from kvdrive.cache.sparse import SparseConfig
from kvdrive.models.flops import prefill_activation_bytes
from kvdrive.tiered.cache import TieredConfig, TieredSparseKVCache

SPARSE = SparseConfig(group_tokens=8, budget=48, sink_tokens=8, window_tokens=16)
GEMMA = {
    "head_dim": 16,
    "sliding_window": 24,
    "query_pre_attn_scalar": 16,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
}


def _prefill(model, cache, prompt, chunk, seq=0, prompt_tokens=None):
    """``prompt`` prefilled alone in ``chunk``-token pieces: the logits of every position (T, V)."""
    cache.add(seq, 400, prompt_tokens=prompt_tokens)
    out = []
    for begin in range(0, len(prompt), chunk):
        piece = torch.tensor([prompt[begin : begin + chunk]])
        b = cache.plan([seq], piece.shape[1])
        out.append(model(piece, cache, b, all_logits=True)[0])
        cache.commit(b)
    return torch.cat(out)


def gathered_bytes(cache, length: int, chunk: int) -> int:
    """Host -> GPU bytes of a prefill that gathers each chunk's prefix from host: per layer and
    chunk [s, e) after the first (which has no prefix), the groups from the window's first (0 on
    a global layer) to e's."""
    g, total = cache.g, 0
    for spec in cache.layer_specs:
        for s in range(chunk, length, chunk):
            e = min(s + chunk, length)
            first = 0 if spec.window is None else max(0, s - spec.window + 1) // g
            total += (-(-e // g) - first) * cache.group_bytes
    return total


def _cache(model, stage=True):
    return TieredSparseKVCache(
        model.config, 2, 400, CPU, F32, TieredConfig(SPARSE, cache_tokens=96, stage_prefill=stage)
    )


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("chunk", [37, 64])
def test_staged_prefill_equals_the_host_gather_and_moves_nothing_to_the_gpu(kind, chunk):
    model = _tiny() if kind == "llama" else _tiny("gemma3_text", **GEMMA)
    prompt = _prompts((203,))[0]
    gathered, staged = _cache(model, stage=False), _cache(model)
    want = _prefill(model, gathered, prompt, chunk)
    got = _prefill(model, staged, prompt, chunk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert gathered.stats()["bytes_host_to_gpu"] == gathered_bytes(gathered, len(prompt), chunk) > 0
    assert staged.stats()["bytes_host_to_gpu"] == 0
    assert (
        staged.stats()["bytes_gpu_to_host"] == gathered.stats()["bytes_gpu_to_host"]
    )  # every token still lands on host
    for cache in (gathered, staged):  # the first decode step sees the same KV either way
        cache.place([0])
        b = cache.plan([0], 1)
        step = model(torch.tensor([[5]]), cache, b)
        cache.commit(b)
        if cache is gathered:
            ref = step
    torch.testing.assert_close(step, ref, rtol=1e-5, atol=1e-5)


def test_the_stage_lives_while_the_prompt_is_prefilled():
    model = _tiny()
    cache = _cache(model)
    prompt = _prompts((100,))[0]
    cache.add(0, 400)
    b = cache.plan([0], 50)
    model(torch.tensor([prompt[:50]]), cache, b)
    cache.commit(b)
    assert cache.prefill.staged(0)
    cache.place([0])  # the prompt is done
    assert not cache.prefill.staged(0)
    cache.add(1, 400)
    cache.plan([1], 20)
    assert cache.prefill.staged(cache.seqs.slot(1))
    cache.free(1)
    assert not cache.prefill.staged(1) and not cache.prefill._stages


def test_a_prompt_the_gpu_has_no_room_for_prefills_from_host():
    model = _tiny()
    prompt = _prompts((120,))[0]
    want = _prefill(model, _cache(model, stage=False), prompt, 40)
    cache = _cache(model)
    cache.prefill._room = lambda: cache.prefill.stage_bytes(400) - 1  # one byte short of the reserved tokens
    got = _prefill(model, cache, prompt, 40)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert cache.stats()["bytes_host_to_gpu"] == gathered_bytes(cache, len(prompt), 40)


def test_a_stage_leaves_room_for_the_chunk_s_activations():
    model = _tiny()
    prompt = _prompts((120,))[0]
    want = _prefill(model, _cache(model, stage=False), prompt, 40)
    for short in (0, 1):
        cache = _cache(model)
        need = cache.prefill.stage_bytes(400) + cache.prefill.activation_bytes(40)
        assert cache.prefill.activation_bytes(40) == prefill_activation_bytes(model.config, 4, 40) > 0
        cache.prefill._room = lambda need=need, short=short: need - short
        got = _prefill(model, cache, prompt, 40)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        staged = cache.stats()["bytes_host_to_gpu"] == 0
        assert staged == (short == 0)


def test_a_prompt_in_one_chunk_attends_to_its_own_kv_with_or_without_a_stage():
    model = _tiny("gemma3_text", **GEMMA)
    prompt = _prompts((150,))[0]
    got = {}
    for stage in (True, False):
        cache = _cache(model, stage)
        got[stage] = _prefill(model, cache, prompt, len(prompt))
        assert cache.stats()["bytes_host_to_gpu"] == 0  # nothing gathered from host
    torch.testing.assert_close(got[False], got[True], rtol=1e-5, atol=1e-5)
    cache = _cache(model, stage=False)
    torch.testing.assert_close(_prefill(model, cache, prompt, 50), got[True], rtol=1e-4, atol=1e-4)
    for reserved, staged in ((len(prompt), False), (len(prompt) + 1, True)):  # a stage only a later chunk reads
        cache = _cache(model)
        cache.add(0, reserved)
        cache.plan([0], len(prompt))
        assert cache.prefill.staged(0) == staged


def test_a_chunk_keeps_only_the_running_layer_s_kv_beside_the_tiers():
    """A 128K-token chunk's KV of every layer is 16 GiB for the 8B shape: the batch holds the
    layer being computed, no more."""
    model = _tiny()
    cache = _cache(model, stage=False)
    cache.add(0, 400)
    b = cache.plan([0], 60)
    model(torch.tensor([_prompts((60,))[0]]), cache, b)
    assert list(b.meta["new_kv"]) == [model.config.num_hidden_layers - 1]


def test_the_stage_holds_the_prompt_not_the_reserved_outputs():
    model = _tiny()
    prompt = _prompts((100,))[0]
    for prompt_tokens, staged in ((100, False), (101, True)):  # one chunk of the whole prompt: no later reader
        cache = _cache(model)
        cache.add(0, 400, prompt_tokens=prompt_tokens)
        cache.plan([0], 100)
        assert cache.prefill.staged(0) == staged
    want = _prefill(model, _cache(model, stage=False), prompt, 50)
    for prompt_tokens, staged in ((100, True), (None, False)):  # room for 100 tokens, not the 400 reserved
        cache = _cache(model)
        cache.prefill._room = lambda c=cache: c.prefill.stage_bytes(100) + c.prefill.activation_bytes(50)
        got = _prefill(model, cache, prompt, 50, prompt_tokens=prompt_tokens)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (cache.stats()["bytes_host_to_gpu"] == 0) == staged


def test_a_chunk_that_skips_the_stage_drops_it():
    """Tokens that reach the cache outside a prefill chunk (a one-token piece) leave a gap: the
    prompt goes on from host, with the same numbers."""
    model = _tiny()
    prompt = _prompts((90,))[0]
    pieces = [40, 1, 49]

    def run(stage):
        cache, out, begin = _cache(model, stage), [], 0
        cache.add(0, 400)
        for n in pieces:
            b = cache.plan([0], n)
            out.append(model(torch.tensor([prompt[begin : begin + n]]), cache, b, all_logits=True)[0])
            cache.commit(b)
            begin += n
        return cache, torch.cat(out)

    cache, got = run(True)
    torch.testing.assert_close(got, run(False)[1], rtol=1e-5, atol=1e-5)
    assert not cache.prefill.staged(0)
