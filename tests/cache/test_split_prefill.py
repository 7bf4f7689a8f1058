"""Split-KV chunk attention (``split_prefill``): prefix partitions + the chunk's own keys, merged
by log-sum-exp, equal plain SDPA; the dispatch splits only a short chunk of one sequence over a
long prefix every query sees."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kvdrive.cache import contiguous, split_prefill
from kvdrive.cache.base import LayerSpec
from kvdrive.cache.contiguous import chunk_attention
from kvdrive.cache.split_prefill import plan_partitions, split_chunk_attention

H100_SMS = 132


def _qkv(b, hq, hkv, t, length, d=16, seed=0, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=gen)
    k, v = torch.randn(2, b, hkv, length, d, generator=gen)
    return (x.to(device, dtype) for x in (q, k, v))


def _plain(q, k, v, scale):
    """SDPA, causal aligned to the lower right over every key of k."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]), scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("prefix,t,parts", [(37, 1, 2), (100, 9, 3), (263, 128, 7), (64, 300, 4), (5, 2, 5)])
def test_split_and_merge_equals_plain_sdpa(hq, hkv, prefix, t, parts):
    q, k, v = _qkv(1, hq, hkv, t, prefix + t)
    got = split_chunk_attention(q, k, v, prefix, parts, scale=0.3)
    torch.testing.assert_close(got, _plain(q, k, v, 0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b,hq,hkv,prefix,t", [(1, 8, 2, 90, 20), (3, 8, 2, 57, 33), (2, 4, 4, 1, 16)])
def test_two_parts_the_prefix_whole_then_the_chunk_square_causal(b, hq, hkv, prefix, t):
    """P = 1, the cuDNN kernel's split: the prefix unmasked, then the chunk's own keys causal."""
    q, k, v = _qkv(b, hq, hkv, t, prefix + t)
    got = split_chunk_attention(q, k, v, prefix, 1, scale=0.3)
    torch.testing.assert_close(got, _plain(q, k, v, 0.3), rtol=1e-5, atol=1e-5)


def test_the_prefill_kernel_setting_names_its_choices(monkeypatch):
    from kvdrive import env
    from kvdrive.errors import KvdriveError

    monkeypatch.setenv("KVDRIVE_PREFILL_KERNEL", "cuDNN")
    assert env.prefill_kernel() == "cudnn"
    monkeypatch.setenv("KVDRIVE_PREFILL_KERNEL", "fa3")
    with pytest.raises(KvdriveError, match="flash, cudnn or triton"):
        env.prefill_kernel()
    monkeypatch.delenv("KVDRIVE_PREFILL_KERNEL")
    assert env.prefill_kernel() == "flash"


def test_two_calls_only_on_cuda_past_the_first_chunk(monkeypatch):
    monkeypatch.setenv("KVDRIVE_PREFILL_KERNEL", "cudnn")
    q, _, _ = _qkv(1, 8, 2, 16, 100, dtype=torch.bfloat16)
    assert not split_prefill.two_calls(q, 84)  # the CPU keeps the one-call path


def test_several_sequences_split_alike():
    """The partitions of B > 1 sequences are batch entries too (a copy, not a view)."""
    q, k, v = _qkv(3, 8, 2, 20, 90 + 20)
    got = split_chunk_attention(q, k, v, 90, 4, scale=0.25)
    torch.testing.assert_close(got, _plain(q, k, v, 0.25), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 4096])
@pytest.mark.parametrize("start,t", [(200, 1), (333, 37), (150, 300)])
def test_chunk_attention_forced_to_split_equals_its_unsplit_path(monkeypatch, window, start, t):
    """Through ``chunk_attention``: a global layer and a window that cuts no key."""
    spec = LayerSpec(window=window, scale=0.25)
    q, k, v = _qkv(1, 8, 2, t, start + t + 3)
    monkeypatch.setattr(split_prefill, "force", False)
    want = chunk_attention(q, k, v, start, spec)
    calls = []
    monkeypatch.setattr(split_prefill, "force", True)
    monkeypatch.setattr(contiguous.split_prefill, "split_chunk_attention", _recording(calls))
    got = chunk_attention(q, k, v, start, spec)
    assert calls == [(start, 2)]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _recording(calls):
    def run(q, k, v, prefix, parts, scale):
        calls.append((prefix, parts))
        return split_chunk_attention(q, k, v, prefix, parts, scale)

    return run


@pytest.mark.parametrize(
    "spec", [LayerSpec(window=64, scale=0.25), LayerSpec(window=None, scale=0.25, softcap=5.0)], ids=["cut", "cap"]
)
def test_a_window_that_cuts_keys_and_softcap_keep_the_unsplit_path(monkeypatch, spec):
    monkeypatch.setattr(split_prefill, "force", True)
    monkeypatch.setattr(contiguous.split_prefill, "split_chunk_attention", _refuse)
    q, k, v = _qkv(1, 8, 2, 30, 230)
    chunk_attention(q, k, v, 200, spec)


def _refuse(*args, **kwargs):
    raise AssertionError("split path taken")


def test_the_cpu_never_splits_unless_forced(monkeypatch):
    monkeypatch.setattr(contiguous.split_prefill, "split_chunk_attention", _refuse)
    q, k, v = _qkv(1, 8, 2, 4, 20000, d=8)
    chunk_attention(q, k, v, 20000 - 4, LayerSpec(window=None, scale=0.3))


@pytest.mark.parametrize(
    "batch,kv_heads,rows,prefix,want",
    [
        (1, 8, 4 * 256, 130_048 - 256, 5),  # Llama-3.2-1B, 256-token chunk: 64 programs -> 5 partitions
        (1, 8, 4 * 256, 32_768, 5),
        (1, 8, 4 * 2048, 130_048, 1),  # 512 programs fill the GPU
        (1, 8, 4 * 256, 8_191, 1),  # short prefix
        (1, 8, 4 * 256, 8_192, 4),  # partitions of at least MIN_PARTITION keys
        (1, 8, 4, 131_072, 33),  # one query: 8 programs
        (2, 8, 4 * 256, 130_048, 1),  # several sequences keep one call
    ],
)
def test_the_rule_splits_only_narrow_calls_over_long_prefixes(batch, kv_heads, rows, prefix, want):
    assert plan_partitions(batch, kv_heads, rows, prefix, H100_SMS) == want


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("prefix,t", [(20_000, 256), (9_001, 1), (12_345, 300)])
def test_the_cuda_split_matches_sdpa_in_bf16(monkeypatch, d, prefix, t):
    """Each part leaves the flash kernel rounded to bf16 and the merge rounds once more, where SDPA
    rounds once: against the fp32 reference the split may err by one more bf16 rounding of the
    output's scale (2^-8 relative), so it stays within twice SDPA's error plus that."""
    q, k, v = _qkv(1, 32, 8, t, prefix + t, d=d, device="cuda", dtype=torch.bfloat16)
    spec = LayerSpec(window=None, scale=d**-0.5)
    monkeypatch.setenv("KVDRIVE_SPLIT_PREFILL", "1")
    assert split_prefill.num_partitions(q, k, prefix) > 1  # the rule splits these on its own
    got = chunk_attention(q, k, v, prefix, spec)
    monkeypatch.setattr(split_prefill, "force", False)
    plain = chunk_attention(q, k, v, prefix, spec)
    ref = _plain(q.float(), k.float(), v.float(), spec.scale)
    err, base = (got.float() - ref).abs().max(), (plain.float() - ref).abs().max()
    assert err <= 2 * base + 2**-8 * ref.abs().max(), (err, base)


def test_the_rule_is_off_unless_enabled(monkeypatch):
    """Without KVDRIVE_SPLIT_PREFILL=1 the rule never splits, on any device; forcing still does."""
    monkeypatch.delenv("KVDRIVE_SPLIT_PREFILL", raising=False)
    q, k, _ = _qkv(1, 32, 8, 256, 20_000 + 256)
    assert split_prefill.num_partitions(q, k, 20_000) == 1
    monkeypatch.setattr(split_prefill, "force", True)
    assert split_prefill.num_partitions(q, k, 20_000) >= 2


@pytest.mark.gpu
@pytest.mark.parametrize("b,t,prefix", [(1, 2048, 30_000), (2, 512, 4_096), (1, 300, 1)])
def test_the_cudnn_two_calls_match_sdpa_in_bf16(monkeypatch, b, t, prefix):
    """Two parts through cuDNN, merged: within the split's bound of the flash path (above)."""
    q, k, v = _qkv(b, 32, 8, t, prefix + t, d=128, device="cuda", dtype=torch.bfloat16)
    spec = LayerSpec(window=None, scale=128**-0.5)
    monkeypatch.setenv("KVDRIVE_PREFILL_KERNEL", "cudnn")
    assert split_prefill.two_calls(q, prefix)
    got = chunk_attention(q, k, v, prefix, spec)
    assert not split_prefill._cudnn_refused  # cuDNN took both parts
    monkeypatch.setenv("KVDRIVE_PREFILL_KERNEL", "flash")
    plain = chunk_attention(q, k, v, prefix, spec)
    ref = _plain(q.float(), k.float(), v.float(), spec.scale)
    err, base = (got.float() - ref).abs().max(), (plain.float() - ref).abs().max()
    assert err <= 2 * base + 2**-8 * ref.abs().max(), (err, base)
