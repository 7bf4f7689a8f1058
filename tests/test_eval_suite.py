"""The eval harness and the synthetic task suite (tokenizer and text of the real SmolLM2 setup)."""

import re

import pytest
import torch

from kvdrive.eval import ruler
from kvdrive.eval.harness import Runner, Setting
from kvdrive.eval.sweep import task_sweep, text_sweep
from kvdrive.eval.text import load_text
from kvdrive.kv.sparse import SparseConfig


@pytest.fixture(scope="module")
def text():
    return load_text("persuasion-excerpt")


def test_excerpt_is_real_prose(text):
    assert text.licence == "public domain" and len(text.text) > 100_000
    assert text.text.startswith("Chapter 1") and "Sir Walter Elliot" in text.text


@pytest.mark.parametrize("family", sorted(ruler.FAMILIES))
def test_items_fit_length_and_are_deterministic(smollm2, text, family):
    tok = smollm2.tokenizer
    a = ruler.make_suite(tok, text.text, 1024, [family], 3, seed=5)
    b = ruler.make_suite(tok, text.text, 1024, [family], 3, seed=5)
    c = ruler.make_suite(tok, text.text, 1024, [family], 3, seed=6)
    assert [i.context_ids for i in a] == [i.context_ids for i in b] != [i.context_ids for i in c]
    for item in a:
        total = len(item.context_ids) + len(item.question_ids)
        assert 1024 - 40 <= total <= 1024
        assert len({tuple(x) for x in item.candidates}) == len(item.candidates) >= 2


def test_needle_sits_at_its_depth(smollm2, text):
    tok = smollm2.tokenizer
    for item in ruler.make_suite(tok, text.text, 2000, ["needle"], 5, seed=1):
        ctx = tok.decode(item.context_ids)
        key = tok.decode(item.candidates[0]).strip()
        at = ctx.find(f"The special magic number is: {key}.")
        assert at >= 0
        assert abs(at / len(ctx) - item.depth) < 0.05


def test_vartrack_answer_follows_the_chain(smollm2, text):
    tok = smollm2.tokenizer
    item = ruler.make_suite(tok, text.text, 1500, ["vartrack"], 1, seed=2)[0]
    ctx, question = tok.decode(item.context_ids), tok.decode(item.question_ids)
    values = dict(re.findall(r"VAR (\w+) = (\d+)\.", ctx))
    links = dict(re.findall(r"VAR (\w+) = VAR (\w+)\.", ctx))
    var = re.search(r"VAR (\w+) is:", question).group(1)
    while var in links:
        var = links[var]
    assert values[var] == tok.decode(item.candidates[0]).strip()


def test_cwe_right_answer_is_most_frequent(smollm2, text):
    tok = smollm2.tokenizer
    item = ruler.make_suite(tok, text.text, 1200, ["cwe"], 1, seed=3)[0]
    words = re.findall(r"\d+\. (\w+)", tok.decode(item.context_ids))
    best = max(set(words), key=words.count)
    assert tok.decode(item.candidates[0]).strip() == best


def test_full_budget_sweep_agrees_with_full_attention(smollm2, text):
    ids = smollm2.tokenizer(text.text, add_special_tokens=False)["input_ids"]
    rows = [ids[:400 + 17], ids[5000 : 5000 + 417]]
    runner = Runner(smollm2, 2, 440, SparseConfig())
    res = text_sweep(runner, rows, 400, [Setting(None, 1.0), Setting("mean", 0.999), Setting("minmax", 0.05)])
    assert res["mean@0.999/shared"]["kl"] < 1e-6 and res["mean@0.999/shared"]["top1_agreement"] == 1.0
    assert res["minmax@0.05/shared"]["kl"] > 1e-4  # a small budget does change the distribution
    assert 0 < res["minmax@0.05/shared"]["attended_fraction"] < 0.3


def test_task_sweep_scores_items(smollm2, text):
    items = ruler.make_suite(smollm2.tokenizer, text.text, 600, ["needle"], 2, seed=0)
    runner = Runner(smollm2, 1, 700, SparseConfig())
    res = task_sweep(runner, items, [Setting(None, 1.0), Setting("mean", 0.999)])
    assert res["full"]["items"] == 2
    assert res["full"]["accuracy"] == res["mean@0.999/shared"]["accuracy"]
