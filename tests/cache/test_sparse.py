"""The sparse cache: with a budget covering the context it is full attention; with a
small budget it attends to exactly the selected groups."""

import pytest
import torch
from factories import decode_steps as _decode
from factories import tiny_model as _tiny

from kvdrive.cache.contiguous import ContiguousKVCache
from kvdrive.cache.sparse import SparseConfig, SparseKVCache


@pytest.mark.parametrize("summary", ["minmax", "mean", "lowrank_seq"])
@pytest.mark.parametrize("mode", ["shared", "per_head"])
def test_full_budget_equals_full_attention(summary, mode):
    model = _tiny()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (150, 77, 203)]  # odd lengths
    dev, dt = torch.device("cpu"), torch.float32
    ref = _decode(model, ContiguousKVCache(model.config, 3, 400, dev, dt), prompts, 20)
    cfg = SparseConfig(group_tokens=8, budget=10_000, summary=summary, mode=mode, rank=16)
    got = _decode(model, SparseKVCache(model.config, 3, 400, dev, dt, cfg), prompts, 20)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_sliding_layers_stay_exact_under_a_small_budget():
    """Gemma-style: sliding layers are dense over their window; only global layers are sparse."""
    model = _tiny(
        "gemma3_text",
        head_dim=16,
        sliding_window=24,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention"],
    )
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (90, 61)]
    dev, dt = torch.device("cpu"), torch.float32
    ref = _decode(model, ContiguousKVCache(model.config, 2, 400, dev, dt), prompts, 12)
    got = _decode(
        model, SparseKVCache(model.config, 2, 400, dev, dt, SparseConfig(group_tokens=8, budget=16)), prompts, 12
    )
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_small_budget_selects_sinks_window_and_budget():
    model = _tiny()
    cfg = SparseConfig(group_tokens=8, budget=64, sink_tokens=8, window_tokens=16)
    cache = SparseKVCache(model.config, 1, 400, torch.device("cpu"), torch.float32, cfg)
    _decode(model, cache, [torch.randint(0, 300, (200,)).tolist()], 1)
    sel = cache.last_selection[0]
    n = int(sel.num_pages[0])
    groups = sel.groups[0, 0, :n].tolist()  # 201 tokens -> 26 groups, the last partly filled
    assert n == 64 // 8
    assert groups[0] == 0 and groups[-2:] == [24, 25]
    assert groups == sorted(set(groups))
    assert cache.summary_bytes > 0


def test_sparse_differs_from_full_when_budget_is_small():
    model = _tiny()
    prompts = [torch.randint(0, 300, (300,)).tolist()]
    dev, dt = torch.device("cpu"), torch.float32
    ref = _decode(model, ContiguousKVCache(model.config, 1, 400, dev, dt), prompts, 4)
    got = _decode(
        model, SparseKVCache(model.config, 1, 400, dev, dt, SparseConfig(group_tokens=8, budget=48)), prompts, 4
    )
    assert (got - ref).abs().max() > 1e-3


def test_compressed_storage_format_is_what_decode_sees():
    """kv_dtype: decode attends to full groups as the format's round trip returns them, so fp8, int8
    and int4 differ from bf16 (full budget, so selection plays no part) by bounded amounts: int8
    least, int4 most."""
    model = _tiny()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (150, 77)]
    dev, dt = torch.device("cpu"), torch.float32
    out = {}
    for fmt in ("bf16", "fp8", "int8", "int4"):
        cfg = SparseConfig(group_tokens=8, budget=10_000, kv_dtype=fmt)
        out[fmt] = _decode(model, SparseKVCache(model.config, 2, 400, dev, dt, cfg), prompts, 12)
    ref = _decode(model, ContiguousKVCache(model.config, 2, 400, dev, dt), prompts, 12)
    torch.testing.assert_close(out["bf16"], ref, rtol=1e-5, atol=1e-5)
    err = {f: float((out[f] - ref).norm() / ref.norm()) for f in ("fp8", "int8", "int4")}
    assert 0 < err["int8"] < err["fp8"] < err["int4"] < 0.2, err


@pytest.mark.parametrize("preset,want", [("smollm2-135m", 0.375), ("gemma3-270m", 0.5), ("llama-3.1-8b", 0.5)])
def test_the_default_budget_is_the_models_measured_one(preset, want):
    """SmolLM2 and Gemma 3 take their measured budgets; a model not measured takes the largest."""
    from kvdrive.cache.sparse import DEFAULT_BUDGET, default_budget
    from kvdrive.models.presets import hf_config
    from kvdrive.models.registry import from_hf_config

    config = from_hf_config(hf_config(preset))
    assert default_budget(config) == want
    assert SparseConfig().for_model(config).budget == want
    assert SparseConfig(budget=2048).for_model(config).budget == 2048  # a budget set is kept
    assert preset != "llama-3.1-8b" or want == DEFAULT_BUDGET


def test_caches_and_llm_resolve_the_budget_for_their_model():
    from kvdrive import LLM, TieredConfig
    from kvdrive.cache.sparse import DEFAULT_BUDGET
    from kvdrive.tiered.cache import TieredSparseKVCache

    model = _tiny()
    cache = SparseKVCache(model.config, 1, 64, torch.device("cpu"), torch.float32)
    assert cache.sparse.budget == DEFAULT_BUDGET and cache.sel_cfg.budget.fraction == DEFAULT_BUDGET
    tiered = TieredSparseKVCache(model.config, 1, 64, torch.device("cpu"), torch.float32, TieredConfig(cache_tokens=64))
    assert tiered.sparse.budget == DEFAULT_BUDGET
    with LLM("random:smollm2-135m", kv_cache=TieredConfig(), max_model_len=256) as llm:
        assert llm.kv_cache.sparse.budget == 0.375
