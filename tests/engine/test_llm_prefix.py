"""LLM with a prefix pool: a repeated prompt loads its prefix KV and generates the same tokens."""

from kvdrive.engine.llm import LLM
from kvdrive.engine.sampling import SamplingParams
from kvdrive.prefix.pool import PrefixConfig
from kvdrive.storage.pool import PoolPath


def test_repeated_prompt_hits_the_pool_and_matches(tmp_path):
    cfg = PrefixConfig(model="smollm2", disks=(PoolPath(str(tmp_path), 64 << 20),), chunk_tokens=128, admit_after=1)
    llm = LLM("smollm2", device="cpu", dtype="float32", prefix_cache=cfg)
    prompt = " ".join(f"Line {i}: the tide came in over the grey stones of Lyme." for i in range(40))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    first = llm.generate([prompt], params)[0]
    assert llm.prefix.stats().stored_chunks_disk > 0
    second = llm.generate([prompt], params)[0]
    assert llm.prefix.last_load.tokens >= 128  # the second request loaded whole chunks
    assert second.token_ids == first.token_ids
    llm.prefix.close()
