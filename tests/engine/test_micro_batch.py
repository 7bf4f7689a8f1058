"""The micro-batch pipeline of the tiered cache (engine/micro_batch.py): the batch in parts,
issued layer by layer in turn, fetching on one lane; it must decode what one batch decodes,
eagerly and inside a CUDA graph."""

from dataclasses import replace

import pytest
import torch
from factories import CPU, F32, graphed_decode
from factories import decode_steps as _decode
from factories import random_prompts as _prompts
from factories import tiny_model as _tiny

from kvdrive.cache.sparse import SparseConfig
from kvdrive.errors import KvdriveError
from kvdrive.tiered.cache import TieredConfig, TieredSparseKVCache


@pytest.mark.parametrize("parts", [2, 3])
def test_micro_batched_decode_matches_one_batch(parts):
    """Decoding the batch in parts (their own streams on a GPU, one after the other here) gives
    each sequence what decoding it in one batch gives."""
    from kvdrive.engine.micro_batch import MicroBatchedDecode, part_slices

    assert part_slices(5, 2) == [slice(0, 2), slice(2, 5)] or part_slices(5, 2) == [slice(0, 3), slice(3, 5)]
    assert [s.stop - s.start for s in part_slices(3, 8)] == [1, 1, 1]
    model, prompts = _tiny(), _prompts()
    sparse = SparseConfig(group_tokens=8, budget=48, sink_tokens=8, window_tokens=16)
    cfg = TieredConfig(sparse, cache_tokens=96, rebalance_after=5, micro_batches=parts)
    ref = _decode(model, TieredSparseKVCache(model.config, 3, 400, CPU, F32, cfg), prompts, 10)
    cache = TieredSparseKVCache(model.config, 3, 400, CPU, F32, cfg)
    _decode(model, cache, prompts, 0)
    step, out = MicroBatchedDecode(model, cache), []
    assert step.parts == parts
    for t in range(10):
        logits, batches = step.forward([0, 1, 2], torch.full((3, 1), 7 + t))
        assert len(batches) == min(parts, 3) and sum(b.batch_size for b in batches) == 3
        for b in batches:
            cache.commit(b)
        out.append(logits)
    torch.testing.assert_close(torch.stack(out, 1), ref, rtol=1e-5, atol=1e-5)
    st = cache.stats()
    assert st["groups_selected"] == st["gpu_hits"] + st["prefetched_hits"] + st["sync_fetched"]
    assert st["steps"] == 10  # a step in parts counts once (the rebalance after 5 depends on it)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "eviction,parts,programs,control",
    [
        ("lookahead", 1, 0, False),
        ("none", 1, 0, False),
        ("lookahead", 2, 0, False),
        ("lookahead", 2, 4, False),
        ("lookahead", 2, 4, True),
    ],
)
def test_gpu_graphed_tiered_decode_matches_eager(eviction, parts, programs, control):
    """The captured step (prefetch stream forked and joined inside the graph, host-side work in
    prepare_replay, a recapture after the capacity rebalance) computes what eager decode does;
    also with each part's selection on its highest-priority control stream."""
    model = _tiny().to("cuda", torch.bfloat16)
    prompts, dev, bf = _prompts(), torch.device("cuda"), torch.bfloat16
    cfg = TieredConfig(
        SparseConfig(group_tokens=8, budget=48, sink_tokens=8, window_tokens=16),
        cache_tokens=96,
        eviction=eviction,
        rebalance_after=5,
        micro_batches=parts,
        fetch_programs=programs,
        control_stream=control,
    )
    eager = _decode(
        model, TieredSparseKVCache(model.config, 3, 400, dev, bf, replace(cfg, control_stream=False)), prompts, 16
    )
    cache = TieredSparseKVCache(model.config, 3, 400, dev, bf, cfg)
    assert cache.supports_cuda_graphs and cache.stats()["control_stream"] == (control and parts > 1)
    _decode(model, cache, prompts, 0)
    torch.testing.assert_close(graphed_decode(model, cache, 3, 16), eager, rtol=2e-2, atol=2e-2)
    assert cache.graph_epoch == 1


@pytest.mark.parametrize("lane", [True, False])
def test_micro_batches_interleave_layers_and_share_one_fetch_lane(lane):
    """Parts are issued layer by layer in turn (part 0's layer l, part 1's layer l, part 0's
    layer l+1, ...), and with ``fetch_lane`` every layer's cache fetches on the cache's one lane."""
    from kvdrive.engine.micro_batch import MicroBatchedDecode
    from kvdrive.tiered.config import resolve_parts

    model, prompts = _tiny(), _prompts()
    cfg = TieredConfig(
        SparseConfig(group_tokens=8, budget=48, sink_tokens=8, window_tokens=16),
        cache_tokens=96,
        micro_batches=2,
        fetch_lane=lane,
    )
    cache = TieredSparseKVCache(model.config, 3, 400, CPU, F32, cfg)
    assert (cache.fetch_lane is not None) == lane
    assert all(c.fetch_lane is cache.fetch_lane for c in cache.caches.values())
    assert resolve_parts(cfg, CPU).fetch_programs == 0 and cache.stats()["fetch_programs"] == 0  # auto, off CUDA
    _decode(model, cache, prompts, 0)
    order, real_attend = [], cache.attend

    def attend(layer, q, batch):
        order.append((layer, batch.seq_ids))
        return real_attend(layer, q, batch)

    cache.attend = attend
    logits, batches = MicroBatchedDecode(model, cache).forward([0, 1, 2], torch.full((3, 1), 7))
    parts = [b.seq_ids for b in batches]
    assert len(parts) == 2 and logits.shape[0] == 3
    assert order == [(layer, p) for layer in range(model.config.num_hidden_layers) for p in parts]


def test_micro_batches_and_fetch_programs_are_counts_or_auto():
    from kvdrive.commands.common import parse_count_or_auto
    from kvdrive.tiered.config import resolve_parts

    assert TieredConfig(fetch_programs=8).fetch_programs == 8
    for bad in (-1, "half", 2.5):
        with pytest.raises(KvdriveError, match="fetch_programs"):
            TieredConfig(fetch_programs=bad)
    for bad in (0, "two", 1.5):
        with pytest.raises(KvdriveError, match="micro_batches"):
            TieredConfig(micro_batches=bad)
    assert parse_count_or_auto("auto") == "auto" and parse_count_or_auto("66") == 66
    with pytest.raises(Exception, match="count"):
        parse_count_or_auto("-3")
    # off CUDA, auto means no micro-batching (the parts would only run one after the other);
    # an explicit count is kept (the CPU tests above micro-batch on purpose)
    auto = resolve_parts(TieredConfig(), CPU)
    assert (auto.micro_batches, auto.fetch_programs) == (1, 0)
    assert resolve_parts(TieredConfig(micro_batches=3), CPU).micro_batches == 3
    cache = TieredSparseKVCache(
        _tiny().config,
        2,
        64,
        CPU,
        F32,
        TieredConfig(SparseConfig(group_tokens=8, budget=32, sink_tokens=8, window_tokens=8), cache_tokens=32),
    )
    assert cache.micro_batches == 1 and cache.fetch_lane is None
