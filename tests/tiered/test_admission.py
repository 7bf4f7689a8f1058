"""Admitting a batch to the tiered cache: host room, free GPU memory, and the GPU selection
cache's size. Each estimate is what the cache then allocates, and a batch that does not fit is
refused before anything is allocated, naming the setting to change."""

from dataclasses import replace

import pytest
import torch
from factories import CPU, F32
from factories import tiny_model as _tiny

from kvdrive.cache.sparse import SparseConfig
from kvdrive.errors import KvdriveError
from kvdrive.models.flops import prefill_activation_bytes
from kvdrive.tiered.cache import TieredConfig, TieredSparseKVCache


def test_a_batch_larger_than_host_memory_is_refused_before_allocating():
    from kvdrive.errors import CapacityError
    from kvdrive.models import presets
    from kvdrive.models.registry import from_hf_config

    cfg = from_hf_config(presets.hf_config("llama-3.1-8b"))
    with pytest.raises(CapacityError, match="--disk"):  # 64 x 1M tokens = 8 TiB of KV
        TieredSparseKVCache(cfg, 64, 1 << 20, CPU, torch.bfloat16)


@pytest.mark.parametrize("sliding", [False, True])
def test_gpu_bytes_per_sequence_matches_what_the_cache_allocates(sliding):
    """The admission estimate is what the GPU part of the cache really takes, per sequence
    (sliding-window layers: their rings of recent tokens)."""
    model = (
        _tiny(
            "gemma3_text",
            head_dim=16,
            sliding_window=24,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
        if sliding
        else _tiny()
    )
    cfg = TieredConfig(
        SparseConfig(group_tokens=8, budget=48, sink_tokens=8, window_tokens=16, summary="mean"), cache_tokens=96
    )
    cache = TieredSparseKVCache(model.config, 3, 400, CPU, F32, cfg)
    real = sum(c.nbytes + c.fresh.numel() for c in cache.caches.values()) + sum(t.nbytes for t in cache.tables.values())
    real += sum(r.nbytes for r in cache.rings.values())
    assert (len(cache.rings) == 2) == sliding
    per_seq = TieredSparseKVCache.gpu_bytes_per_seq(model.config, 400, F32, cfg)
    trash = len(cache.caches) * cache.group_bytes  # one trash page per layer
    assert real - trash == 3 * per_seq


# the 8B shape's arithmetic below is written for this selection: 2048 tokens, mean summaries (1/32 of the KV)
BUDGET_2048 = SparseConfig(budget=2048, sink_tokens=64, window_tokens=256, summary="mean")


def test_admission_counts_free_gpu_memory(monkeypatch):
    """On a GPU, the batch admitted is what the free GPU memory holds (host room aside), and a
    cache too large for it is refused before anything is allocated, naming the fix."""
    from kvdrive.errors import CapacityError
    from kvdrive.models import presets
    from kvdrive.models.registry import from_hf_config
    from kvdrive.tiered import admission as tiered_mod

    cfg = from_hf_config(presets.hf_config("llama-3.1-8b"))
    tcfg = TieredConfig(BUDGET_2048, cache_tokens=16384)
    per_seq = TieredSparseKVCache.gpu_bytes_per_seq(cfg, 32768, torch.bfloat16, tcfg)
    assert 16 << 30 < 16 * per_seq < 40 << 30  # 32 layers x 1024 pages x 64 KiB per sequence, plus summaries
    free = tiered_mod.GPU_HEADROOM + 10 * per_seq + 1
    monkeypatch.setattr(tiered_mod, "host_room", lambda: 1 << 50)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 << 30))
    gpu = torch.device("cuda")
    assert TieredSparseKVCache.seqs_that_fit(cfg, 32768, torch.bfloat16, tcfg, gpu) == 10
    assert TieredSparseKVCache.seqs_that_fit(cfg, 32768, torch.bfloat16, tcfg) > 10  # no device: host only
    with pytest.raises(CapacityError, match="--gpu-cache-tokens"):
        TieredSparseKVCache(cfg, 16, 32768, gpu, torch.bfloat16, tcfg)


def test_auto_cache_size_fills_the_free_gpu_memory_it_is_given(monkeypatch):
    """cache_tokens='auto': admission counts a sequence's minimum (one selection), and the cache
    built for a batch grows into AUTO_GPU_SHARE of the free GPU memory, up to the context;
    off CUDA it is AUTO_CPU_TOKENS."""
    from kvdrive.models import presets
    from kvdrive.models.registry import from_hf_config
    from kvdrive.tiered import admission as adm
    from kvdrive.tiered.config import AUTO_CPU_TOKENS, AUTO_GPU_SHARE

    cfg = from_hf_config(presets.hf_config("llama-3.1-8b"))
    auto, bf = TieredConfig(BUDGET_2048), torch.bfloat16
    assert auto.cache_tokens == "auto"
    minimum = adm.gpu_bytes_per_seq(cfg, 32768, bf, auto)
    assert minimum == adm.gpu_bytes_per_seq(cfg, 32768, bf, TieredConfig(BUDGET_2048, cache_tokens=0))
    gpu = torch.device("cuda")
    for free_gib in (20, 60):
        free = adm.GPU_HEADROOM + (free_gib << 30)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, f=free: (f, 80 << 30))
        tokens = adm.resolve_cache_tokens(cfg, 16, 32768, bf, auto, gpu)
        used = 16 * adm.gpu_bytes_per_seq(cfg, 32768, bf, TieredConfig(BUDGET_2048, cache_tokens=tokens))
        room = free - adm.GPU_HEADROOM - adm.prefill_stage_bytes(cfg, 32768, bf)  # one prompt prefills on the GPU
        room -= prefill_activation_bytes(cfg, 2, auto.prefill_tokens)  # and its chunk's activations
        assert tokens % 16 == 0 and used <= AUTO_GPU_SHARE * room
        assert used > AUTO_GPU_SHARE * room - 16 * 32 * 2 * (64 << 10)  # within a page per sequence and layer
    assert 8192 < tokens < 32768  # 60 GiB for 16 sequences of the 8B shape
    whole = replace(auto, prefill_tokens=32768)  # a prompt prefilled in one forward leaves its activations room
    fewer = adm.resolve_cache_tokens(cfg, 16, 32768, bf, whole, gpu)

    def used(t):
        return 16 * adm.gpu_bytes_per_seq(cfg, 32768, bf, TieredConfig(BUDGET_2048, cache_tokens=t))

    gap = AUTO_GPU_SHARE * (prefill_activation_bytes(cfg, 2, 32768) - prefill_activation_bytes(cfg, 2, 2048))
    assert abs(gap - (used(tokens) - used(fewer))) < 16 * 32 * 2 * (64 << 10)  # the pages given up, to a page
    assert adm.resolve_cache_tokens(cfg, 1, 32768, bf, auto, gpu) == 32768  # one sequence: all its groups fit
    assert adm.resolve_cache_tokens(cfg, 16, 32768, bf, auto, CPU) == AUTO_CPU_TOKENS
    assert adm.resolve_cache_tokens(cfg, 16, 32768, bf, TieredConfig(BUDGET_2048, cache_tokens=512), gpu) == 512
    cache = TieredSparseKVCache(_tiny().config, 2, 200, CPU, F32, TieredConfig(SparseConfig(budget=48, group_tokens=8)))
    assert cache.tiered.cache_tokens == AUTO_CPU_TOKENS and cache.stats()["cache_tokens"] == AUTO_CPU_TOKENS
    with pytest.raises(KvdriveError, match="'auto'"):
        TieredConfig(cache_tokens="big")
