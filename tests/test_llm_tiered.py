"""Generation through the tiered cache on a real model (SmolLM2-135M, CPU)."""

from kvdrive.cache.sparse import SparseConfig
from kvdrive.engine.llm import LLM
from kvdrive.engine.sampling import SamplingParams
from kvdrive.tiered.cache import TieredConfig

PROMPT = ("The history of the lighthouse keeper's family, told over three generations, begins on a cold "
          "morning when the supply boat failed to arrive. ") * 12


def test_budget_covering_the_context_gives_the_same_greedy_tokens(smollm2):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    plain = LLM(loaded=smollm2).generate([PROMPT], params)[0]
    full = TieredConfig(SparseConfig(budget=1 << 20), cache_tokens=256, rebalance_after=4)
    tiered = LLM(loaded=smollm2, kv_cache=full).generate([PROMPT], params)[0]
    assert len(plain.prompt_token_ids) > 300
    assert tiered.token_ids == plain.token_ids


def test_small_budget_over_disk_generates(smollm2, tmp_path):
    from kvdrive.storage.pool import PoolPath

    cfg = TieredConfig(SparseConfig(budget=128, sink_tokens=16, window_tokens=32), cache_tokens=192,
                       disk=(PoolPath(str(tmp_path), 256 << 20),), host_bytes=30 * 64 * 12288, direct="off")
    llm = LLM(loaded=smollm2, kv_cache=cfg)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 6


def test_deferred_disk_misses_with_room_for_everything_give_the_same_greedy_tokens(smollm2, tmp_path):
    """Over the disk with deferred misses, when the arena holds every group nothing is left out:
    the greedy tokens are those of the plain cache."""
    from kvdrive.storage.pool import PoolPath

    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    plain = LLM(loaded=smollm2).generate([PROMPT], params)[0]
    cfg = TieredConfig(SparseConfig(budget=1 << 20), cache_tokens=256, rebalance_after=4,
                       disk=(PoolPath(str(tmp_path), 256 << 20),), host_bytes=30 * 64 * 24576, direct="off",
                       disk_misses="defer")
    llm = LLM(loaded=smollm2, kv_cache=cfg)
    tiered = llm.generate([PROMPT], params)[0]
    assert tiered.token_ids == plain.token_ids


def test_generate_cli_names_the_missing_flag(capsys):
    from kvdrive.cli import main

    assert main(["generate", "hi", "--disk", "/tmp"]) == 2
    assert "add --budget" in capsys.readouterr().err
