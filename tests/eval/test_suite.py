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


def test_compressed_storage_is_compared_with_its_bf16_twin(smollm2, text):
    ids = smollm2.tokenizer(text.text, add_special_tokens=False)["input_ids"]
    rows = [ids[: 300 + 13], ids[5000 : 5000 + 313]]
    runner = Runner(smollm2, 2, 330, SparseConfig())
    mean = Setting("mean", 0.2)
    settings = [Setting(None, 1.0), mean, Setting("mean", 0.2, kv_dtype="int4")]
    res = text_sweep(runner, rows, 300, settings)
    plain, int4 = res["mean@0.2/shared"], res["mean@0.2/shared+int4"]
    assert "vs_bf16" not in plain and int4["vs_bf16"]["tokens"] == 24
    assert 0 < int4["vs_bf16"]["kl"] < 0.5  # 4-bit KV moves the distribution, a little
    assert int4["vs_bf16"]["top1_agreement"] >= 0.5


def test_eval_spec_runs_every_format_after_bf16():
    from kvdrive.commands.eval import KV_DTYPES as CLI_KV_DTYPES
    from kvdrive.eval.run import EvalSpec
    from kvdrive.quant import KV_DTYPES

    assert CLI_KV_DTYPES == KV_DTYPES
    labels = [s.label for s in EvalSpec(summaries=("mean",), budgets=(0.1,), kv_dtypes=("fp8", "bf16")).settings()]
    assert labels == ["full", "mean@0.1/shared", "full+fp8", "mean@0.1/shared+fp8"]
    labels = [s.label for s in EvalSpec(summaries=("mean",), budgets=(0.1,), kv_dtypes=("int4",)).settings()]
    assert labels == ["full", "full+int4", "mean@0.1/shared+int4"]
