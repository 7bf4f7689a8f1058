"""The paged plain cache on the real models (SmolLM2 and Gemma 3, CPU): greedy generations equal
the contiguous cache's, and ``LLM`` uses it."""

import pytest
import torch

from kvdrive.cache.contiguous import ContiguousKVCache
from kvdrive.cache.paged import PagedKVCache
from kvdrive.engine import generation
from kvdrive.engine.llm import LLM
from kvdrive.engine.request import Request
from kvdrive.engine.sampling import SamplingParams
from kvdrive.errors import KvdriveError

PROMPTS = [
    "The history of the printing press begins",
    "List the planets of the solar system in order from the sun, with one fact about each:",
    "Q: What is 12 times 12?\nA:",
]


def _greedy(loaded, cache, max_tokens=(20, 12, 16)):
    tok = loaded.tokenizer
    reqs = [
        Request(i, tok(p)["input_ids"], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), n)
        for i, (p, n) in enumerate(zip(PROMPTS, max_tokens))
    ]
    # small prefill chunks: prompts cross pages inside a chunk and between chunks
    list(generation.run(loaded.model, cache, reqs, loaded.config.eos_token_ids, tok, prefill_chunk=7))
    return [r.output_ids for r in reqs]


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_paged_greedy_tokens_equal_contiguous(name, request):
    loaded = request.getfixturevalue(name)
    args = (loaded.config, 3, 128, torch.device("cpu"), loaded.model.dtype)
    want = _greedy(loaded, ContiguousKVCache(*args))
    got = _greedy(loaded, PagedKVCache(*args, page_tokens=16))
    assert got == want and [len(t) for t in got] == [20, 12, 16]


def test_llm_uses_the_paged_cache(smollm2):
    llm = LLM(loaded=smollm2)
    out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert isinstance(llm.cache, PagedKVCache) and len(out.token_ids) == 4
    assert llm.cache.pages.num_held == 0  # the finished sequence gave its pages back


def test_the_prefill_chunk_changes_how_a_prompt_is_computed_not_what_comes_out(smollm2):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    whole = LLM(loaded=smollm2, prefill_chunk=4096).generate(PROMPTS[1:2], params)[0]
    pieces = LLM(loaded=smollm2, prefill_chunk=5).generate(PROMPTS[1:2], params)[0]
    assert len(whole.prompt_token_ids) > 5 and pieces.token_ids == whole.token_ids


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_a_prefill_chunk_below_one_token_is_refused(smollm2, bad):
    with pytest.raises(KvdriveError, match="prefill_chunk must be an integer >= 1"):
        LLM(loaded=smollm2, prefill_chunk=bad)


def test_the_engine_leaves_a_chunks_activations_free():
    from kvdrive.commands.common import PREFILL_CHUNK as CLI_PREFILL_CHUNK
    from kvdrive.engine.core import PREFILL_CHUNK
    from kvdrive.models import presets
    from kvdrive.models.flops import prefill_activation_bytes
    from kvdrive.models.registry import from_hf_config
    from kvdrive.tiered.config import TieredConfig

    assert CLI_PREFILL_CHUNK == PREFILL_CHUNK == TieredConfig().prefill_tokens
    from transformers import AutoConfig

    fields = dict(presets.PRESETS["llama-3.1-8b"])
    cfg = from_hf_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    per_token = prefill_activation_bytes(cfg, 2, 131072) / 131072
    assert 120e3 <= per_token <= 160e3  # about 120 KB a token measured for 32K and 128K chunks on the H100
