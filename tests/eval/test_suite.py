"""The eval harness on the real SmolLM2 weights: sweeps agree with full attention when the
budget covers the context, and differ when it does not."""

import pytest

from kvdrive.cache.sparse import SparseConfig
from kvdrive.eval import corpus
from kvdrive.eval.harness import Runner, Setting
from kvdrive.eval.sweep import text_sweep


@pytest.fixture(scope="module")
def text():
    return corpus.load_text("persuasion-excerpt")


def test_full_budget_sweep_agrees_with_full_attention(smollm2, text):
    ids = smollm2.tokenizer(text.text, add_special_tokens=False)["input_ids"]
    rows = [ids[: 300 + 13], ids[5000 : 5000 + 313]]
    runner = Runner(smollm2, 2, 330, SparseConfig())
    res = text_sweep(runner, rows, 300, [Setting(None, 1.0), Setting("mean", 0.999), Setting("minmax", 0.05)])
    assert res["full"]["kl"] == 0 and res["full"]["tokens"] == 24
    assert res["mean@0.999/shared"]["kl"] < 1e-6 and res["mean@0.999/shared"]["top1_agreement"] == 1.0
    assert res["minmax@0.05/shared"]["kl"] > 1e-4  # a small budget does change the distribution
    assert 0 < res["minmax@0.05/shared"]["attended_fraction"] < 0.3
