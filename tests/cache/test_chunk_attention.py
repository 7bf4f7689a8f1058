"""``chunk_attention`` (a batch sharing one start, no materialised mask) equals masked attention
over the whole prefix: GQA, sliding windows, softcap, several chunks, spans starting past 0."""

import pytest
import torch

from kvdrive.cache import contiguous
from kvdrive.cache.base import LayerSpec
from kvdrive.cache.contiguous import ContiguousKVCache, attention_mask, chunk_attention, sdpa


def masked_reference(q, k, v, start, spec, k_start=0):
    """The masked path: every key of k (positions k_start ..) under the causal/window mask, fp64."""
    b, t = q.shape[0], q.shape[2]
    mask = attention_mask(torch.full((b,), start - k_start), t, k.shape[2], spec.window)  # shifted positions
    return sdpa(q.double(), k.double(), v.double(), mask, spec.scale, spec.softcap).to(q.dtype)


def _qkv(b, hq, hkv, t, length, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=gen)
    k, v = torch.randn(2, b, hkv, length, d, generator=gen)
    return q, k, v


@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("start,t", [(0, 37), (50, 37), (83, 1), (0, 1), (120, 9)])
@pytest.mark.parametrize("window", [None, 16, 40, 300])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunk_attention_equals_the_masked_reference(hq, hkv, start, t, window, softcap):
    spec = LayerSpec(window=window, scale=0.25, softcap=softcap)
    q, k, v = _qkv(2, hq, hkv, t, start + t + 5)  # keys past the chunk's end are ignored
    got = chunk_attention(q, k, v, start, spec)
    want = masked_reference(q, k[:, :, : start + t], v[:, :, : start + t], start, spec)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["flash", "cudnn"])
@pytest.mark.parametrize("start,t", [(0, 37), (0, 64), (50, 37)])
def test_each_prefill_kernel_setting_equals_the_masked_reference(monkeypatch, kernel, start, t):
    """A chunk with no prefix takes SDPA's square causal path under cudnn; the result is the same."""
    monkeypatch.setenv("KVDRIVE_PREFILL_KERNEL", kernel)
    spec = LayerSpec(window=None, scale=0.25)
    q, k, v = _qkv(1, 8, 2, t, start + t)
    got = chunk_attention(q, k, v, start, spec)
    torch.testing.assert_close(got, masked_reference(q, k, v, start, spec), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 24])
def test_a_span_that_starts_past_zero_is_aligned_by_k_start(window):
    """The sparse cache gathers from a group boundary: keys at positions k_start .. end."""
    spec = LayerSpec(window=window, scale=0.3)
    start, t, k_start = 70, 20, 32
    q, k, v = _qkv(1, 4, 2, t, start + t)
    whole = chunk_attention(q, k, v, start, spec)
    if window is None:
        k_start = 0  # a global layer sees every key
    got = chunk_attention(q, k[:, :, k_start:], v[:, :, k_start:], start, spec, k_start=k_start)
    torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-6)


GEMMA = {
    "head_dim": 16,
    "sliding_window": 24,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
}


def _tiny(model_type="llama", **extra):
    from factories import tiny_model

    return tiny_model(model_type, **extra)


def _chunked_logits(model, ids, chunks):
    cache = ContiguousKVCache(model.config, 1, ids.shape[1], torch.device("cpu"), torch.float32)
    cache.add(0, ids.shape[1])
    out, begin = [], 0
    for n in chunks:
        batch = cache.plan([0], n)
        out.append(model(ids[:, begin : begin + n], cache, batch, all_logits=True)[0])
        cache.commit(batch)
        begin += n
    return torch.cat(out)


@pytest.mark.parametrize(
    "model_type,extra",
    [
        ("llama", {}),
        ("mistral", {"sliding_window": 20}),
        ("gemma3_text", GEMMA),
        ("gemma3_text", {**GEMMA, "attn_logit_softcapping": 20.0}),
    ],
)
def test_chunked_prefill_equals_the_masked_path(monkeypatch, model_type, extra):
    model = _tiny(model_type, **extra)
    ids = torch.randint(0, 300, (1, 96), generator=torch.Generator().manual_seed(3))
    chunks = [30, 1, 40, 25]
    got = _chunked_logits(model, ids, chunks)
    monkeypatch.setattr(contiguous, "chunk_attention", masked_reference)
    want = _chunked_logits(model, ids, chunks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_prefill_chunk_builds_no_mask_over_the_prefix(monkeypatch):
    """Regression: the plain cache's chunked prefill built a (B, 1, T, L) boolean mask per chunk,
    which kept SDPA off its flash kernel; a shared start now needs none."""
    model = _tiny()

    def refuse(*args, **kwargs):
        raise AssertionError("a mask over the prefix was built")

    monkeypatch.setattr(contiguous, "attention_mask", refuse)
    monkeypatch.setattr(contiguous, "grouped_sdpa", refuse)
    ids = torch.randint(0, 300, (1, 80))
    _chunked_logits(model, ids, [32, 32, 16])
