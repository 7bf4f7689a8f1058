"""Compressed host and disk tiers (``TieredConfig.kv_dtype``): full groups stored quantized, the
open group exact. Decode must attend to exactly what the GPU-resident sparse cache attends to
when it simulates the same format (``SparseConfig.kv_dtype``): each full group as the format's
round trip returns it, the partly filled group exact, summaries from the exact keys."""

from dataclasses import replace

import pytest
import torch
from factories import CPU, F32
from factories import decode_steps as _decode
from factories import disk_config as _disk_cfg
from factories import random_prompts as _prompts
from factories import tiny_model as _tiny

from kvdrive.cache.sparse import SparseConfig, SparseKVCache
from kvdrive.errors import KvdriveError
from kvdrive.storage.disk import ReadFailureWarning
from kvdrive.tiered.cache import TieredConfig, TieredSparseKVCache

SPARSE = SparseConfig(group_tokens=8, budget=48, sink_tokens=8, window_tokens=16, summary="tokenmax")


def _config(tmp_path, disk: bool, **kw) -> TieredConfig:
    return (
        _disk_cfg(tmp_path, SPARSE, 40, cache_tokens=96, **kw) if disk else TieredConfig(SPARSE, cache_tokens=96, **kw)
    )


@pytest.mark.parametrize("disk", [False, True])
@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
def test_compressed_tiers_match_the_gpu_resident_cache_in_the_same_format(tmp_path, fmt, disk):
    """Prompts of 150, 77 and 203 tokens (partly filled last groups at G=8), 12 decode steps: every
    sequence crosses a group boundary (its open group is sealed mid-decode)."""
    model, prompts = _tiny(), _prompts()
    ref = _decode(model, SparseKVCache(model.config, 3, 400, CPU, F32, replace(SPARSE, kv_dtype=fmt)), prompts, 12)
    cache = TieredSparseKVCache(model.config, 3, 400, CPU, F32, _config(tmp_path, disk, kv_dtype=fmt))
    got = _decode(model, cache, prompts, 12)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    exact = _decode(model, SparseKVCache(model.config, 3, 400, CPU, F32, SPARSE), prompts, 12)
    assert (got - exact).abs().max() > 1e-4  # the format is applied, not bypassed
    st = cache.stats()
    assert st["kv_dtype"] == fmt and st["sync_fetched"] > 0 and st["gpu_hits"] > 0
    if disk:
        assert st["disk_reads"] > 0 and st["lost"] == 0


def _chunked_then_decode(model, cache, prompts, chunk: int, steps: int) -> torch.Tensor:
    """Each prompt prefilled in ``chunk``-token steps (chunk ends fall inside groups, and some
    chunks fill the group the one before left open), then ``steps`` batched decode steps."""
    for i, p in enumerate(prompts):
        cache.add(i, 400)
        for a in range(0, len(p), chunk):
            b = cache.plan([i], len(p[a : a + chunk]))
            model(torch.tensor([p[a : a + chunk]]), cache, b)
            cache.commit(b)
    out = []
    for t in range(steps):
        b = cache.plan(list(range(len(prompts))), 1)
        out.append(model(torch.full((len(prompts), 1), 7 + t), cache, b))
        cache.commit(b)
    return torch.stack(out, 1)


@pytest.mark.parametrize("disk", [False, True])
@pytest.mark.parametrize("chunk", [5, 37])
def test_chunked_prefill_seals_the_groups_it_fills(tmp_path, chunk, disk):
    """A chunk writes the head of its first group into the open row and seals it when full, then
    its whole groups quantized, then its tail: the same decode as a one-shot prefill into the
    GPU-resident cache in the same format, every full group summarized from exact keys."""
    model, prompts = _tiny(), _prompts()
    ref = _decode(model, SparseKVCache(model.config, 3, 400, CPU, F32, replace(SPARSE, kv_dtype="fp8")), prompts, 10)
    cache = TieredSparseKVCache(model.config, 3, 400, CPU, F32, _config(tmp_path, disk, kv_dtype="fp8"))
    got = _chunked_then_decode(model, cache, prompts, chunk, 10)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for layer in cache.sparse_layers:
        assert cache.summaries.done[layer][:3] == [(len(p) + 10) // 8 for p in prompts]


def test_deferred_disk_misses_serve_the_open_group_exact(tmp_path):
    """``disk_misses="defer"`` with an arena that holds every group: nothing is left out, so the
    deferred path's fetch (its source rows from the arena map, the open group redirected to its
    exact row) gives the same logits."""
    model, prompts = _tiny(), _prompts()
    ref = _decode(model, SparseKVCache(model.config, 3, 400, CPU, F32, replace(SPARSE, kv_dtype="int4")), prompts, 10)
    cfg = _disk_cfg(tmp_path, SPARSE, 200, cache_tokens=96, kv_dtype="int4", disk_misses="defer")
    got = _decode(model, TieredSparseKVCache(model.config, 3, 400, CPU, F32, cfg), prompts, 10)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bad_settings_are_refused_with_the_fix():
    with pytest.raises(KvdriveError, match="kv_dtype must be one of"):
        TieredConfig(SPARSE, kv_dtype="fp4")
    with pytest.raises(KvdriveError, match="lowrank_seq"):
        TieredConfig(replace(SPARSE, summary="lowrank_seq"), kv_dtype="fp8")
    with pytest.raises(KvdriveError, match="set TieredConfig.kv_dtype"):
        TieredConfig(replace(SPARSE, kv_dtype="fp8"))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
def test_gpu_compressed_tiers_match_the_gpu_resident_cache(fmt):
    """Pinned stored and open rows, sealing on the GPU, the dequantizing fetch through UVA."""
    model = _tiny().to("cuda", torch.bfloat16)
    prompts, dev, bf = _prompts(), torch.device("cuda"), torch.bfloat16
    ref = _decode(model, SparseKVCache(model.config, 3, 400, dev, bf, replace(SPARSE, kv_dtype=fmt)), prompts, 24)
    cache = TieredSparseKVCache(model.config, 3, 400, dev, bf, TieredConfig(SPARSE, cache_tokens=96, kv_dtype=fmt))
    got = _decode(model, cache, prompts, 24)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    assert cache.stats()["prefetched_hits"] > 0


@pytest.mark.parametrize("fmt,ratio", [("fp8", 1.55), ("int4", 2.6)])
def test_the_same_host_bytes_hold_more_tokens_by_the_stored_bytes_ratio(tmp_path, fmt, ratio):
    """An 8B-shaped layer (8 KV heads, D=128, bf16) at G=16: arena slots, the full host pool and
    admission's bytes per sequence all count stored bytes."""
    from kvdrive.models.presets import hf_config
    from kvdrive.models.registry import from_hf_config
    from kvdrive.storage.layout import GroupLayout
    from kvdrive.storage.pool import PoolPath
    from kvdrive.tiered import admission
    from kvdrive.tiered.disk_host_kv import DiskBackedHostKV
    from kvdrive.tiered.host_kv import FullHostKV

    bf = torch.bfloat16
    layouts = {f: GroupLayout(1, 8, 128, bf, 16, f) for f in ("bf16", fmt)}
    slots = {}
    for f, lay in layouts.items():
        (tmp_path / f).mkdir()
        disk = (PoolPath(str(tmp_path / f), 64 << 20),)
        arena = DiskBackedHostKV(lay, 1, 8, CPU, 64 * 65536, disk, direct="off")
        slots[f] = arena.index.num_slots
        arena.close()
    assert slots["bf16"] == 64 and slots[fmt] >= ratio * 64
    full = {f: FullHostKV(lay, 2, 32, CPU) for f, lay in layouts.items()}
    stored = {f: h.nbytes - (h.opened.nbytes if h.opened else 0) for f, h in full.items()}
    assert stored["bf16"] == 2 * 32 * 65536 and stored["bf16"] >= ratio * stored[fmt]
    cfg = from_hf_config(hf_config("llama-3.1-8b"))
    per = {f: admission.host_bytes_per_seq(cfg, 131072, bf, TieredConfig(kv_dtype=f)) for f in layouts}
    assert per["bf16"] == 16 << 30 and per["bf16"] >= ratio * per[fmt]


@pytest.mark.gpu
def test_gpu_host_pool_pins_its_stored_bytes_not_the_next_power_of_two():
    """A host pool of 1.1 GiB of fp8 rows takes 1.1 GiB of page-locked memory (torch's pinned
    allocator would take 2 GiB), and a fetch kernel can read it."""
    from kvdrive.bench.decode.systems import mem_available
    from kvdrive.storage.layout import GroupLayout
    from kvdrive.tiered.host_kv import FullHostKV

    layout = GroupLayout(32, 8, 128, torch.bfloat16, 16, "fp8")  # 37,120 stored bytes a group and layer
    torch.zeros(1, device="cuda")  # the CUDA context's own host memory is not the pool's
    before = mem_available()
    pool = FullHostKV(layout, 1, 1000, torch.device("cuda"))
    taken = (before - mem_available()) / (1 << 30)
    want = 32 * 1000 * 37120 / (1 << 30)
    assert pool.stored.is_pinned() and pool.stored.data_ptr() % 4096 == 0
    assert 0.9 * want < taken < want + 0.25, (taken, want)
    pool.stored[5, 7, :16] = 7
    assert pool.stored[5, 7].to("cuda", non_blocking=True)[:17].tolist() == [7] * 16 + [0]


def test_a_corrupt_compressed_slot_on_disk_is_a_checksum_miss_not_served(tmp_path):
    """Flip one byte of every disk slot once the prompts are written: each read of a stored group
    fails its checksum (which covers the stored bytes), and the group leaves that step's
    attention, counted as lost, as for an uncompressed tier."""
    model, prompts = _tiny(), _prompts()
    cache = TieredSparseKVCache(model.config, 3, 400, CPU, F32, _config(tmp_path, True, kv_dtype="fp8"))
    _decode(model, cache, prompts, 2)
    cache.host._reap(wait_all=True)  # every write behind has landed
    for path in tmp_path.glob("*.extent"):
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            data[:: cache.host.layout.slot_bytes] = bytes(b ^ 0xFF for b in data[:: cache.host.layout.slot_bytes])
            f.seek(0)
            f.write(data)
    with pytest.warns(ReadFailureWarning, match="checksum"):
        for t in range(4):
            b = cache.plan([0, 1, 2], 1)
            out = model(torch.full((3, 1), 9 + t), cache, b)
            cache.commit(b)
            assert torch.isfinite(out).all()
    assert cache.stats()["lost"] > 0
