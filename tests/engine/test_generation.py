"""Batch generation, streaming and sampling on the real SmolLM2 weights."""

import pytest
import torch

from kvdrive.engine.sampling import SamplingParams, filter_logits


@pytest.fixture(scope="module")
def llm(smollm2):
    from kvdrive.engine.llm import LLM

    return LLM(loaded=smollm2)  # reuse the model loaded once for all tests


PROMPTS = [
    "The history of the printing press begins",
    "List the planets of the solar system in order from the sun, with one fact about each:",
    "Q: What is 12 times 12?\nA:",
    "Write a haiku about the sea.",
]


def test_batch_equals_one_at_a_time(llm):
    # Different prompt lengths and different max_tokens: sequences leave the batch at
    # different steps, so decode runs over non-contiguous cache slots too.
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (24, 9, 17, 30)]
    together = llm.generate(PROMPTS, params)
    alone = [llm.generate([p], q)[0] for p, q in zip(PROMPTS, params)]
    assert len({len(o.prompt_token_ids) for o in together}) == len(PROMPTS)
    for a, b, q in zip(together, alone, params):
        assert a.token_ids == b.token_ids
        assert len(a.token_ids) == q.max_tokens and a.finish_reason == "length"


def test_stream_concatenates_to_generate(llm):
    p = SamplingParams(max_tokens=20, temperature=0)
    streamed = "".join(llm.stream(PROMPTS[0], p))
    assert streamed == llm.generate([PROMPTS[0]], p)[0].text
    assert streamed


def test_seeded_sampling_is_reproducible(llm):
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    a = llm.generate([PROMPTS[1]], p)[0].token_ids
    b = llm.generate([PROMPTS[1]], p)[0].token_ids
    c = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True))[
        0
    ].token_ids
    assert a == b and a != c


def test_stop_string_and_stop_token(llm):
    greedy = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=40, temperature=0))[0]
    word = greedy.text.split()[3]
    cut = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=40, temperature=0, stop=(word,)))[0]
    assert cut.finish_reason == "stop" and word not in cut.text and greedy.text.startswith(cut.text)
    first = greedy.token_ids[2]
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=40, temperature=0, stop_token_ids=(first,)))[0]
    assert out.token_ids == greedy.token_ids[:2] and out.finish_reason == "stop"


def test_chat_template_answers(llm):
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=20, temperature=0)
    )
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_top_k_and_top_p_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_k=2)).isfinite()
    assert kept.tolist() == [True, True, False, False, False]
    probs = logits.softmax(-1)  # 0.636, 0.234, 0.086, ...
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.8)).isfinite()
    assert kept.tolist() == [True, True, False, False, False] and probs[0] < 0.8 < probs[:2].sum()
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.5)).isfinite()
    assert kept.tolist() == [True, False, False, False, False]


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(stop=("",)), "stop"),
    ],
)
def test_invalid_sampling_params(kwargs, word):
    from kvdrive.errors import KvdriveError

    with pytest.raises(KvdriveError, match=word):
        SamplingParams(**kwargs)


def test_prompt_longer_than_context(llm):
    from kvdrive.errors import KvdriveError

    with pytest.raises(KvdriveError, match="shorten the prompt"):
        llm.generate([[1] * llm.config.max_position_embeddings], SamplingParams(max_tokens=1))


def test_generation_stops_at_context_end(llm):
    n = llm.config.max_position_embeddings
    llm_short = llm
    old = llm_short.max_model_len
    llm_short.max_model_len = 64
    try:
        out = llm_short.generate([[1] * 60], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    finally:
        llm_short.max_model_len = old
    assert len(out.token_ids) == 4 and out.finish_reason == "length" and n > 64


def test_continuous_batching_admits_queued_requests_as_sequences_finish(smollm2):
    """Two decode slots for four requests: the queue drains as sequences finish, and every
    output equals the one generated with all four in the batch at once."""
    from kvdrive.engine.llm import LLM

    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (12, 5, 9, 7)]
    wide = LLM(loaded=smollm2).generate(PROMPTS, params)
    narrow_llm = LLM(loaded=smollm2, max_batch=2)
    narrow = narrow_llm.generate(PROMPTS, params)
    assert [o.token_ids for o in narrow] == [o.token_ids for o in wide]
    assert [len(o.token_ids) for o in narrow] == [12, 5, 9, 7]


def test_a_tiny_top_p_or_temperature_samples_the_most_likely_token():
    """A top_p below float32's resolution dropped every token and sampling failed on NaNs; a
    temperature near zero overflowed the scaled logits. Found by fuzzing the server."""
    from kvdrive.engine.sampling import sample

    logits = torch.tensor([[0.5, 3.0, 1.0]])
    for p in (
        SamplingParams(top_p=5e-324),
        SamplingParams(temperature=5e-324),
        SamplingParams(temperature=1e-9, top_p=1e-40),
    ):
        assert sample(logits, [p], [torch.Generator().manual_seed(0)]) == [1]
