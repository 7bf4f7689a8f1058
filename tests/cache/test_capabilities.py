"""Optional cache capabilities are declared on ``KVCache`` with defaults: a plain cache answers
every question the engine asks, and nothing outside the caches probes them."""

import re
from pathlib import Path

import torch

import kvdrive
from kvdrive.cache.base import KVCache
from kvdrive.cache.contiguous import ContiguousKVCache
from kvdrive.models.loader import load_config


def test_plain_cache_has_every_capability_off():
    cfg = load_config("random:smollm2-135m")
    cache = ContiguousKVCache(cfg, 2, 32, torch.device("cpu"), torch.float32)
    assert cache.supports_cuda_graphs and not cache.supports_micro_batches and not cache.supports_profile
    assert cache.micro_batches == 1 and cache.graph_epoch == 0 and cache.hint_layers == frozenset()
    assert cache.max_seqs == 2 and cache.device == torch.device("cpu") and cache.token_capacity == 64
    assert cache.can_add(8)
    cache.add(0, 8)
    cache.place([0])
    cache.prepare_replay([0])
    cache.reset_stats()
    assert cache.stats() == {}
    cache.close()
    assert cache.length(0) == 0


def test_nothing_probes_a_cache():
    root = Path(kvdrive.__file__).parent
    probe = re.compile(r"\b(getattr|hasattr)\((self\.)?cache\b")
    hits = [
        f"{p.relative_to(root)}:{i}"
        for p in root.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if probe.search(line)
    ]
    assert hits == []
    declared = {"place", "hint", "prepare_replay", "stats", "reset_stats", "close", "export_kv", "can_add"}
    assert declared <= set(vars(KVCache))
