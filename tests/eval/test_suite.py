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
    from kvdrive.commands.common import KV_DTYPES as CLI_KV_DTYPES
    from kvdrive.eval.run import EvalSpec
    from kvdrive.quant import KV_DTYPES

    assert CLI_KV_DTYPES == KV_DTYPES
    labels = [s.label for s in EvalSpec(summaries=("mean",), budgets=(0.1,), kv_dtypes=("fp8", "bf16")).settings()]
    assert labels == ["full", "mean@0.1/shared", "full+fp8", "mean@0.1/shared+fp8"]
    labels = [s.label for s in EvalSpec(summaries=("mean",), budgets=(0.1,), kv_dtypes=("int4",)).settings()]
    assert labels == ["full", "full+int4", "mean@0.1/shared+int4"]


def test_summary_grammar_takes_dense_layers_mode_and_budget():
    from kvdrive.commands.eval import SUMMARIES
    from kvdrive.eval import setting_spec
    from kvdrive.eval.run import EvalSpec
    from kvdrive.retrieval.summaries import SUMMARIZERS

    assert set(SUMMARIES) == set(SUMMARIZERS)
    p = setting_spec.parse("tokenmax+dense=1,0/per_head@0.1875", SUMMARIES)
    assert p == ("tokenmax", "per_head", (0, 1), 0.1875)
    assert setting_spec.parse("mean", SUMMARIES) == ("mean", None, None, None)
    for bad in ("tokenmax+dense=", "tokenmax+dense=a", "tokenmax+wide=1", "tokenmax@1.5", "nope", "mean/both"):
        with pytest.raises(ValueError, match="choose a summary"):
            setting_spec.parse(bad, SUMMARIES)
    spec = EvalSpec(summaries=("tokenlse+dense=0@0.25", "mean"), budgets=(0.1,), dense_layers=(3,))
    labels = [s.label for s in spec.settings()]
    assert labels == ["full", "tokenlse+dense=0@0.25/shared", "mean@0.1/shared"]
    assert [s.dense for s in spec.settings()] == [None, (0,), None]


def test_a_setting_with_every_layer_dense_is_full_attention(smollm2, text):
    """Dense layers of a setting are attended whole: all of them dense equals full attention,
    and the attended share counts a dense layer as the whole context."""
    ids = smollm2.tokenizer(text.text, add_special_tokens=False)["input_ids"]
    rows = [ids[: 300 + 13], ids[5000 : 5000 + 313]]
    runner = Runner(smollm2, 2, 330, SparseConfig())
    every = tuple(smollm2.config.global_layers)
    half = every[: len(every) // 2]
    settings = [Setting(None, 1.0), Setting("tokenmax", 0.05, dense=every), Setting("tokenmax", 0.05, dense=half)]
    res = text_sweep(runner, rows, 300, settings)
    dense_all = res["tokenmax+dense=" + ",".join(map(str, every)) + "@0.05/shared"]
    dense_half = res["tokenmax+dense=" + ",".join(map(str, half)) + "@0.05/shared"]
    assert dense_all["kl"] < 1e-6 and dense_all["attended_fraction"] == 1.0
    assert dense_half["kl"] > 1e-6 and 0.5 < dense_half["attended_fraction"] < 0.7


def test_the_default_budgets_include_the_models_own():
    """Without --budgets, eval reports the budget a user of the model runs (SmolLM2: 0.375)."""
    from kvdrive.eval.run import EvalSpec, with_model_budgets
    from kvdrive.models.presets import hf_config
    from kvdrive.models.registry import from_hf_config

    smollm2, gemma3 = (from_hf_config(hf_config(n)) for n in ("smollm2-135m", "gemma3-270m"))
    assert with_model_budgets(EvalSpec(), smollm2).budgets == (0.0625, 0.25, 0.375)
    assert with_model_budgets(EvalSpec(), gemma3).budgets == (0.0625, 0.25, 0.5)
    assert with_model_budgets(EvalSpec(budgets=(0.1,)), smollm2).budgets == (0.1,)
