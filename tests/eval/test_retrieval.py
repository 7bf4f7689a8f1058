"""The retrieval suite: items, exact-match scoring, intervals, and the greedy sweep on SmolLM2."""

import pytest

from kvdrive.cache.sparse import SparseConfig
from kvdrive.errors import KvdriveError
from kvdrive.eval import corpus, retrieval
from kvdrive.eval.harness import Runner, Setting
from kvdrive.eval.retrieval_sweep import run_family, summarize


@pytest.fixture(scope="module")
def text():
    return corpus.load_text("persuasion-excerpt").text


@pytest.fixture(scope="module")
def builder(smollm2, text):
    return retrieval.Builder(smollm2.tokenizer, text)


@pytest.mark.parametrize("family", retrieval.FAMILIES)
def test_items_fit_the_length_and_batch(builder, smollm2, family):
    items = builder.build(family, 1024, 6, seed=1)
    assert [len(i.prompt_ids) for i in items] == [1024] * 6
    assert len({len(i.question_ids) for i in items}) == 1  # one batch, no padding
    for it in items:
        fact = smollm2.tokenizer.decode(it.context_ids[slice(*it.span)])
        assert it.answer in fact  # the asked fact holds the answer
        assert smollm2.tokenizer.decode(it.context_ids).count(it.answer) == 1  # stated once
        assert it.answer.isdigit()


def test_depths_spread_and_facts_sit_there(builder):
    items = builder.build("passkey", 2048, 10, seed=0)
    assert [round(i.depth, 3) for i in items] == [round(d, 3) for d in retrieval.depths(10)]
    for it in items:
        head = len(it.context_ids) - (len(it.context_ids) - it.span[0])
        assert abs(head / len(it.context_ids) - it.depth) < 0.08  # sentence boundaries move it a little
    assert items[0].span[0] < items[-1].span[0]


def test_items_are_deterministic_in_the_seed(builder):
    a = builder.build("multikey", 1024, 3, seed=5)
    assert a == builder.build("multikey", 1024, 3, seed=5)
    assert a != builder.build("multikey", 1024, 3, seed=6)


def test_too_short_and_unknown_are_refused(builder):
    with pytest.raises(KvdriveError, match="too short"):
        builder.build("multikey", 100, 1)
    with pytest.raises(KvdriveError, match="unknown retrieval family"):
        builder.build("cwe", 1024, 1)


def test_a_tokenizer_that_cuts_every_word_refuses_keyword_items(smollm2, text):
    """Regression: a broken GGUF conversion left no one-token word, and the six-key lookup died
    in random.sample; it now says what is wrong."""

    class PerCharacter:  # every character its own token: no word of 4+ letters is one token
        def __init__(self, tok):
            self.tok = tok

        def encode(self, s, add_special_tokens=True):
            return [i for ch in s for i in self.tok.encode(ch, add_special_tokens=False)]

        def decode(self, ids):
            return self.tok.decode(ids)

    cut = retrieval.Builder(PerCharacter(smollm2.tokenizer), text)
    with pytest.raises(KvdriveError, match="single token"):
        cut.build("multikey", 1024, 1)


def test_exact_match_takes_the_first_number(builder):
    item = builder.build("passkey", 512, 1)[0]
    assert retrieval.score(item, f" {item.answer}. Remember")
    assert not retrieval.score(item, f" 1{item.answer}")
    assert not retrieval.score(item, f" 42, or maybe {item.answer}")
    assert not retrieval.score(item, " the pass key")


def test_wilson_interval():
    assert retrieval.wilson(0, 10)[0] == 0.0 and retrieval.wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    lo, hi = retrieval.wilson(90, 100)
    assert lo == pytest.approx(0.8256, abs=1e-3) and hi == pytest.approx(0.9448, abs=1e-3)


def test_paired_difference_counts_lost_and_won():
    ref = [True] * 90 + [False] * 10
    same = retrieval.paired_difference(ref, ref)
    assert same["lost"] == same["won"] == 0 and same["difference"] == 0
    assert same["interval"][0] <= 0 <= same["interval"][1]
    worse = retrieval.paired_difference(ref, [False] * 10 + [True] * 80 + [False] * 10)
    assert worse["lost"] == 10 and worse["difference"] == pytest.approx(-0.1)
    assert worse["interval"][1] < 0  # ten losses and no wins: significantly worse


def test_a_compressed_format_is_paired_with_its_bf16_twin_item_by_item():
    """Equal scores can hide swapped items: vs_bf16 counts what fp8 lost and won against the same
    setting over bf16 KV, on the same items."""
    from types import SimpleNamespace

    items = [SimpleNamespace(depth=d) for d in retrieval.depths(6)]
    plain, fp8 = Setting("tokenmax", 0.5), Setting("tokenmax", 0.5, kv_dtype="fp8")

    def runs(right):
        return {"prefilled": {"right": right, "attended": [0.5]}}

    outcomes = {
        "full": runs([True] * 6),
        plain.label: runs([True, True, True, False, True, False]),
        fp8.label: runs([True, True, False, True, True, False]),  # one lost, one won: same score
    }
    res = summarize(items, outcomes, [Setting(None, 1.0), plain, fp8])
    row = res[fp8.label]["prefilled"]
    assert row["correct"] == res[plain.label]["prefilled"]["correct"] == 4
    assert row["vs_bf16"]["lost"] == 1 and row["vs_bf16"]["won"] == 1 and row["vs_bf16"]["difference"] == 0
    assert "vs_bf16" not in res[plain.label]["prefilled"] and "vs_bf16" not in res["full"]["prefilled"]


@pytest.mark.slow
def test_sweep_with_a_covering_budget_equals_full_attention(smollm2, builder):
    """A budget that covers the context answers exactly what full attention answers, in both
    modes; and the summary records intervals, depths and the paired difference."""
    items = builder.build("passkey", 640, 3, seed=2)
    runner = Runner(smollm2, 3, 672, SparseConfig())
    settings = [Setting(None, 1.0), Setting("tokenmax", 0.999), Setting("mean", 0.05)]
    out = run_family(
        runner,
        smollm2.tokenizer,
        items,
        settings,
        ("prefilled", "sparse-question"),
        3,
        list(smollm2.config.global_layers),
    )
    full = out["full"]["prefilled"]["right"]
    assert sum(full) >= 2  # SmolLM2 finds a pass key in 640 tokens
    for mode in ("prefilled", "sparse-question"):
        assert out["tokenmax@0.999/shared"][mode]["right"] == out["full"][mode]["right"]
    res = summarize(items, out)
    assert res["full"]["prefilled"]["items"] == 3 and res["full"]["prefilled"]["interval"][0] >= 0
    assert res["tokenmax@0.999/shared"]["prefilled"]["vs_full"]["lost"] == 0
    assert res["tokenmax@0.999/shared"]["prefilled"]["attended"] > 0.99
    assert res["mean@0.05/shared"]["prefilled"]["attended"] < 0.3  # the small budget attends less
