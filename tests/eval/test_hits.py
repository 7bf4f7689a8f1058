"""Selection-cache hit rate and selection locality (kvdrive.eval.hits) on a tiny random model."""

from types import SimpleNamespace

import pytest
import torch
from factories import tiny_model as _tiny

from kvdrive.cache.sparse import SparseConfig
from kvdrive.eval.harness import Runner, Setting
from kvdrive.eval.hits import CachePoint, HitsSpec, SelectionTrace, grid, measure_point, overlap
from kvdrive.retrieval.select import Selection, selection_mask
from kvdrive.tiered.selection_cache import EVICTIONS

L, M = 200, 24  # prefill tokens, teacher-forced steps


@pytest.fixture(scope="module")
def prefilled():
    """A tiny model with two random prompts prefilled, decoded once under mean@25% with a trace."""
    model = _tiny()
    lm = SimpleNamespace(model=model, config=model.config)
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 300, (L + M,), generator=gen).tolist() for _ in range(2)]
    runner = Runner(lm, 2, L + M + 8, SparseConfig(group_tokens=8, sink_tokens=8, window_tokens=16))
    runner.prefill([r[:L] for r in rows])
    tokens = torch.tensor([r[L:] for r in rows])  # (2, M)
    runner.use(Setting("mean", 0.25), [L, L])
    sel = runner.sparse.selection()
    trace = SelectionTrace(runner.cache.max_groups, sel.n_sink, sel.n_window)
    runner.decode(tokens, trace)
    return lm, runner, tokens, trace.result()


def _point(prefilled, point, cache_tokens, repeat=False):
    lm, runner, tokens, _ = prefilled
    if repeat:  # the same input token every step: the query barely moves
        tokens = tokens[:, :1].expand(-1, tokens.shape[1])
    return measure_point(lm, runner.cache, L, tokens, runner.sparse, point, cache_tokens, HitsSpec(steps=M))


def test_overlap_on_a_hand_built_case():
    cur = torch.tensor([[1, 1, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    prev = torch.tensor([[1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert overlap(cur, prev).tolist() == [0.5, 1.0]  # 2 of {0, 1, 3, 5}; an empty selection needs nothing
    ignore = torch.tensor([[1, 0, 0, 0, 0, 1], [0] * 6], dtype=torch.bool)
    assert overlap(cur, prev, ignore).tolist() == [0.5, 1.0]  # 1 of {1, 3}


def test_trace_counts_a_hand_built_sequence_of_selections():
    """Groups 0..9, one sequence; steps select {0,2,3}, {0,3,5}, {0,2,5}: overlap 2/3 and 2/3,
    seen 2/3 then 3/3; with sink 0 and the last group of the window forced, chosen overlap
    leaves out group 0 and the last group of the sequence (at 10 groups: 9, never selected)."""
    trace = SelectionTrace(n_max=10, n_sink=1, n_window=1)
    for groups in ([0, 2, 3], [0, 3, 5], [0, 2, 5]):
        sel = Selection(torch.tensor([[groups]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32))
        assert selection_mask(sel, 10)[0, 0].nonzero().flatten().tolist() == groups
        cache = SimpleNamespace(last_selection={4: sel}, g=16)
        trace.after_step(cache, SimpleNamespace(start=(159,), seq_ids=(0,)))
    res = trace.result()
    assert res["samples"] == 2
    assert res["overlap"]["per_layer"]["4"] == pytest.approx(2 / 3)
    assert res["per_step_overlap"] == pytest.approx([2 / 3, 2 / 3])
    assert res["seen"]["per_layer"]["4"] == pytest.approx((2 / 3 + 1) / 2)
    assert res["chosen_overlap"]["per_layer"]["4"] == pytest.approx((1 / 2 + 1 / 2) / 2)  # {3,5}: 3; {2,5}: 5


def test_a_cache_holding_everything_hits_what_the_trace_saw_before(prefilled):
    """Without prefetch and room for every group, a hit is exactly a group selected at an earlier
    step of the decode: the cache's warm hit rate equals the trace's ``seen`` share."""
    _, runner, _, locality = prefilled
    res = _point(prefilled, CachePoint("lookahead", 1, False), cache_tokens=runner.cache.max_len)
    w = res["warm"]
    assert w["hit_rate"] == pytest.approx(locality["seen"]["mean"], abs=1e-6)
    assert 0 < w["hit_rate"] < 1
    assert w["gpu_hit_rate"] == w["hit_rate"] and w["prefetched_hit_rate"] == 0 and w["prefetch_precision"] is None
    assert res["cold"]["hit_rate"] == 0  # the cache starts empty


def test_repeated_query_hits_nearly_always_after_the_cold_step(prefilled):
    _, runner, _, _ = prefilled
    res = _point(prefilled, CachePoint("lookahead", 1, True), cache_tokens=runner.cache.max_len, repeat=True)
    assert res["warm"]["hit_rate"] > 0.95
    assert res["warm"]["host_to_gpu_bytes_per_token"] < res["cold"]["host_to_gpu_bytes_per_token"]


@pytest.mark.parametrize("prefetch", [True, False])
def test_none_eviction_never_hits_across_steps(prefilled, prefetch):
    res = _point(prefilled, CachePoint("none", 1, prefetch), cache_tokens=0)
    w = res["warm"]
    assert w["gpu_hit_rate"] == 0
    assert w["sync_fetch_rate"] == pytest.approx(1 - w["hit_rate"])
    if prefetch:
        assert 0 < w["prefetched_hit_rate"] <= 1 and 0 < w["prefetch_precision"] <= 1
    else:
        assert w["hit_rate"] == 0


@pytest.mark.parametrize("eviction", ["lookahead", "lru"])
def test_rates_are_fractions_and_add_up(prefilled, eviction):
    """A cache of one budget's pages (8 of 28 groups) must evict; its rates stay consistent."""
    res = _point(prefilled, CachePoint(eviction, 1, True), cache_tokens=64)
    w = res["warm"]
    for k in ("hit_rate", "gpu_hit_rate", "prefetched_hit_rate", "sync_fetch_rate"):
        assert 0 <= w[k] <= 1
    assert w["gpu_hit_rate"] + w["prefetched_hit_rate"] == pytest.approx(w["hit_rate"])
    assert w["hit_rate"] + w["sync_fetch_rate"] == pytest.approx(1)
    assert w["counts"]["groups_selected"] == 3 * 2 * (M - 1) * 7  # layers x sequences x warm steps x pages
    assert w["sync_fetch_rate"] > 0  # too small to hold the working set


def test_grid_and_cli_names():
    from kvdrive.commands.eval import EVICTIONS as CLI_EVICTIONS

    assert CLI_EVICTIONS == EVICTIONS
    points = grid(HitsSpec(cache_x=(1, 2), prefetch=(True, False)))
    assert len(points) == 2 * 2 * 2 + 2  # none takes one cache size
    assert len({p.label for p in points}) == len(points)
    assert len(grid(HitsSpec(cache_x=(1, 2), prefetch=(True,), disk="/tmp/x"))) == 2 * (2 * 2 + 1)
