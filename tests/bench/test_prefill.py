import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from kvdrive.bench import prefill


@pytest.mark.slow
def test_bench_prefill_runs_tiny_on_cpu(tmp_path):
    p = argparse.ArgumentParser()
    prefill.add_arguments(p)
    out = tmp_path / "prefill.json"
    assert prefill.run(p.parse_args(["--tiny", "--systems", *prefill.SYSTEMS, "-o", str(out)])) == 0
    doc = json.loads(out.read_text())
    assert doc["bench"] == "prefill" and "commit" in doc["environment"] and doc["command"]
    assert doc["config"]["plain"].startswith("PagedKVCache") and doc["config"]["contiguous"].startswith("Contiguous")
    assert [r["length"] for r in doc["results"]] == prefill.TINY["lengths"]
    for r in doc["results"]:
        assert r["first_tokens_agree"]  # the same weights, the same greedy token
        for name in prefill.SYSTEMS:
            assert r[name]["prefill_s"] > 0 and r[name]["tflops"] > 0
        assert r["contiguous_over_plain"] > 0 and r["tiered_over_plain"] > 0
        assert r["tiered"]["staged"] and r["tiered"]["bytes_host_to_gpu"] == 0  # the prompt stayed on the GPU
        assert r["tiered"]["bytes_gpu_to_host"] > 0


def test_plain_is_the_paged_cache_llm_uses_and_contiguous_is_an_extra_system():
    from kvdrive.cache.contiguous import ContiguousKVCache
    from kvdrive.cache.paged import PagedKVCache
    from kvdrive.models import presets
    from kvdrive.models.registry import from_hf_config

    model = SimpleNamespace(
        config=from_hf_config(presets.hf_config("smollm2-135m")), device=torch.device("cpu"), dtype=torch.float32
    )
    assert type(prefill._make_cache("plain", model, 80, 80)) is PagedKVCache
    assert type(prefill._make_cache("contiguous", model, 80, 80)) is ContiguousKVCache
    p = argparse.ArgumentParser()
    prefill.add_arguments(p)
    assert p.parse_args([]).systems == ["plain", "tiered", "transformers"]
    assert p.parse_args(["--systems", "plain", "contiguous"]).systems == ["plain", "contiguous"]


def test_prefill_flops_count_causal_pairs_and_windows():
    from kvdrive.models import presets
    from kvdrive.models.registry import from_hf_config

    cfg = from_hf_config(presets.hf_config("llama-3.1-8b"))
    f = prefill.prefill_flops(cfg, 131072)
    assert abs(f["linear"] / 131072 / 2 - 6.98e9) < 0.01e9  # 2 x the 8B's non-embedding matrices per token
    assert f["attention"] == 4 * 32 * 128 * 32 * 131072 * 131073 // 2
    gemma = from_hf_config(presets.hf_config("gemma3-270m"))
    w = next(x for x in gemma.sliding_windows if x is not None)
    short, long = prefill.prefill_flops(gemma, w), prefill.prefill_flops(gemma, 4 * w)
    pairs_global = 4 * w * (4 * w + 1) // 2
    n_local = sum(x is not None for x in gemma.sliding_windows)
    per_pair = 4 * gemma.num_attention_heads * gemma.head_dim
    assert long["attention"] == per_pair * (
        (len(gemma.sliding_windows) - n_local) * pairs_global + n_local * (w * (w + 1) // 2 + 3 * w * w)
    )
    assert short["attention"] == per_pair * len(gemma.sliding_windows) * w * (w + 1) // 2
