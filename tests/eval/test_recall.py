"""Recall of next-layer prediction on the real SmolLM2 weights (kvdrive.eval.recall)."""

import pytest

from kvdrive.cache.sparse import SparseConfig
from kvdrive.eval import corpus
from kvdrive.eval.harness import Runner, Setting
from kvdrive.eval.sweep import text_sweep


@pytest.fixture(scope="module")
def rows(smollm2):
    text = corpus.load_text("persuasion-excerpt")
    ids = smollm2.tokenizer(text.text, add_special_tokens=False)["input_ids"]
    return [ids[: 600 + 9], ids[7000 : 7000 + 609]]


def test_recall_is_one_when_the_budget_covers_the_context(smollm2, rows):
    runner = Runner(smollm2, 2, 630, SparseConfig())
    res = text_sweep(runner, rows, 600, [Setting(None, 1.0), Setting("mean", 0.999)], recall=True)
    assert "recall" not in res["full"]
    rec = res["mean@0.999/shared"]["recall"]
    assert rec["samples"] == 2 * 8
    assert list(rec["per_layer"]) == [str(i) for i in range(1, smollm2.config.num_hidden_layers)]
    assert all(r == 1.0 for r in rec["per_layer"].values())


def test_recall_under_a_small_budget_is_a_fraction_and_leaves_logits_alone(smollm2, rows):
    settings = [Setting(None, 1.0), Setting("minmax", 0.25)]  # 10 of 38 groups: 5 chosen
    plain = text_sweep(Runner(smollm2, 2, 630, SparseConfig()), rows, 600, settings)
    probed = text_sweep(Runner(smollm2, 2, 630, SparseConfig()), rows, 600, settings, recall=True)
    label = "minmax@0.25/shared"
    assert probed[label]["kl"] == plain[label]["kl"]  # measuring recall changes nothing the model computes
    per = probed[label]["recall"]["per_layer"]
    assert all(0.0 <= r <= 1.0 for r in per.values())
    assert min(per.values()) < 1.0  # the previous layer's hidden state is not the true query
    assert max(per.values()) > 0.0


def test_recall_skips_dense_layers(smollm2, rows):
    runner = Runner(smollm2, 2, 630, SparseConfig(dense_layers=(0, 1, 2)))
    res = text_sweep(runner, rows[:1] * 2, 600, [Setting(None, 1.0), Setting("mean", 0.05)], recall=True)
    assert "1" not in res["mean@0.05/shared"]["recall"]["per_layer"]
    assert "3" in res["mean@0.05/shared"]["recall"]["per_layer"]
