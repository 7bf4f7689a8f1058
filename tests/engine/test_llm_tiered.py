"""Generation through the tiered cache on a real model (SmolLM2-135M, CPU)."""

import pytest

from kvdrive.cache.sparse import SparseConfig
from kvdrive.engine.llm import LLM
from kvdrive.engine.sampling import SamplingParams
from kvdrive.errors import KvdriveError
from kvdrive.tiered.cache import TieredConfig

PROMPT = (
    "The history of the lighthouse keeper's family, told over three generations, begins on a cold "
    "morning when the supply boat failed to arrive. "
) * 12


def test_budget_covering_the_context_gives_the_same_greedy_tokens(smollm2):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    plain = LLM(loaded=smollm2).generate([PROMPT], params)[0]
    full = TieredConfig(SparseConfig(budget=1 << 20), cache_tokens=256, rebalance_after=4)
    tiered = LLM(loaded=smollm2, kv_cache=full).generate([PROMPT], params)[0]
    assert len(plain.prompt_token_ids) > 300
    assert tiered.token_ids == plain.token_ids


def test_small_budget_over_disk_reads_back_and_matches_host_only(smollm2, tmp_path, monkeypatch):
    """Two prompts over an arena that holds three quarters of their groups: the second prompt's
    prefill pushes the first one's groups out to disk, decoding reads them back, and (disk misses
    waited for) the greedy tokens are those of the host-only tier."""
    from kvdrive.storage.pool import PoolPath
    from kvdrive.tiered import cache as tiered_cache

    built = []

    class Recorded(tiered_cache.TieredSparseKVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(tiered_cache, "TieredSparseKVCache", Recorded)
    prompts = [PROMPT, PROMPT.replace("lighthouse keeper", "ferry captain").replace("cold", "bright")]
    sparse = SparseConfig(budget=128, sink_tokens=16, window_tokens=32)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    host_only = LLM(loaded=smollm2, kv_cache=TieredConfig(sparse, cache_tokens=192)).generate(prompts, params)
    slot = 2 * 3 * 16 * 64 * 4  # a group of one layer: K|V x 3 KV heads x 16 tokens x 64 dims, fp32
    groups = sum(len(o.prompt_token_ids) // 16 + 1 for o in host_only)  # per layer, both prompts
    cfg = TieredConfig(
        sparse,
        cache_tokens=192,
        disk=(PoolPath(str(tmp_path), 256 << 20),),
        host_bytes=30 * (3 * groups // 4) * slot,
        direct="off",
    )
    over_disk = LLM(loaded=smollm2, kv_cache=cfg).generate(prompts, params)
    st = built[-1].stats()
    assert built[-1].host.may_miss and st["disk_writes"] > 0 and st["lost"] == 0
    assert st["disk_reads"] + st["placed_reads"] > 0  # groups came back from disk
    assert [o.token_ids for o in over_disk] == [o.token_ids for o in host_only]
    assert all(len(o.token_ids) == 6 for o in over_disk)


def test_deferred_disk_misses_with_room_for_everything_give_the_same_greedy_tokens(smollm2, tmp_path):
    """Over the disk with deferred misses, when the arena holds every group nothing is left out:
    the greedy tokens are those of the plain cache."""
    from kvdrive.storage.pool import PoolPath

    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    plain = LLM(loaded=smollm2).generate([PROMPT], params)[0]
    cfg = TieredConfig(
        SparseConfig(budget=1 << 20),
        cache_tokens=256,
        rebalance_after=4,
        disk=(PoolPath(str(tmp_path), 256 << 20),),
        host_bytes=30 * 64 * 24576,
        direct="off",
        disk_misses="defer",
    )
    llm = LLM(loaded=smollm2, kv_cache=cfg)
    tiered = llm.generate([PROMPT], params)[0]
    assert tiered.token_ids == plain.token_ids


def test_generate_cli_names_the_missing_flag(capsys):
    from kvdrive.cli import main

    assert main(["generate", "hi", "--disk", "/tmp"]) == 2
    assert "add --budget" in capsys.readouterr().err


def test_the_tiered_cache_leaves_room_for_the_llm_s_prefill_chunk(smollm2):
    """``LLM(prefill_chunk=N)`` passes N to the tiered cache as its largest prefill forward (the
    room its auto-sized GPU cache and the prefill stage leave), never lowering a larger one."""
    assert LLM(loaded=smollm2, kv_cache=TieredConfig(), prefill_chunk=8192).kv_cache.prefill_tokens == 8192
    bigger = TieredConfig(prefill_tokens=16384)
    assert LLM(loaded=smollm2, kv_cache=bigger, prefill_chunk=512).kv_cache.prefill_tokens == 16384
    assert LLM(loaded=smollm2, kv_cache=TieredConfig()).kv_cache.prefill_tokens == 2048
    for bad in (0, -1, 1.5, True):
        with pytest.raises(KvdriveError, match="prefill_tokens must be a token count"):
            TieredConfig(prefill_tokens=bad)


def test_a_prompt_prefilled_in_one_chunk_gets_no_stage(smollm2, monkeypatch):
    """The engine tells the cache the prompt's length: a prompt done in one chunk keeps no copy of
    its KV on the GPU (no later chunk would read it), one of several chunks does."""
    from kvdrive.tiered.prefill import TieredPrefill

    staged = []
    begin = TieredPrefill.begin

    def spy(self, slot_list, starts, num_new):
        begin(self, slot_list, starts, num_new)
        staged.append(self.staged(slot_list[0]))

    monkeypatch.setattr(TieredPrefill, "begin", spy)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for chunk, want in ((2048, [False]), (128, [True, True, True])):
        staged.clear()
        out = LLM(loaded=smollm2, kv_cache=TieredConfig(cache_tokens=256), prefill_chunk=chunk).generate(
            [PROMPT], params
        )
        assert len(out[0].prompt_token_ids) in range(257, 385)  # three chunks of 128
        assert staged == want
