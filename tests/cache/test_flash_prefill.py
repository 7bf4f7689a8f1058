"""kvdrive's flash kernel for a prefill chunk (``flash_prefill``): equal to its torch twin and to
SDPA under ``causal_lower_right`` (GQA, prefixes of any length, several sequences, the LSE), on
the CPU through Triton's interpreter and on the GPU compiled; chosen by ``KVDRIVE_PREFILL_KERNEL``."""

import itertools

import pytest
import torch
from conftest import KERNEL_DEVICES, check_kernel

from kvdrive.cache import flash_prefill
from kvdrive.cache.base import LayerSpec
from kvdrive.cache.contiguous import chunk_attention

# (B, H_q, H_kv, T, S, D): the chunk alone, over a prefix, a prefix that ends inside a key
# block, one query, several sequences, GQA 4 and 1
CASES = [
    (1, 4, 2, 20, 20, 16),
    (1, 4, 1, 33, 97, 32),
    (2, 2, 2, 5, 100, 16),
    (1, 8, 2, 1, 40, 16),
    (1, 4, 4, 48, 49, 64),
]


def _qkv(b, hq, hkv, t, s, d, device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=gen)
    k, v = torch.randn(2, b, hkv, s, d, generator=gen)
    return (x.to(device, dtype) for x in (q, k, v))


def check_against_twin(device: str) -> None:
    for i, (b, hq, hkv, t, s, d) in enumerate(CASES):
        for dtype, tma in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True)):
            q, k, v = _qkv(b, hq, hkv, t, s, d, device, dtype, i)
            out, lse = flash_prefill.chunk_attention_triton(q, k, v, 0.3, with_lse=True, tma=tma)
            ref, ref_lse = flash_prefill.chunk_attention_reference(q, k, v, 0.3, with_lse=True)
            # fp32: summation order only; bf16: P rounded to bf16 before P @ V, and the output once
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
            torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-4)


def check_pages_against_twin(device: str) -> None:
    """Keys read in place from shuffled pages of a pool (by pointers, and by tensor descriptors
    with a key block inside a page) equal the same keys gathered first."""
    gen = torch.Generator().manual_seed(5)
    b, hq, hkv, g, d = 2, 4, 2, 16, 32
    pool = torch.randn(20, 2, hkv, g, d, generator=gen).to(device)
    rows = torch.stack([torch.randperm(20, generator=gen)[:6] for _ in range(b)]).to(device, torch.int32)
    x = pool[rows.long()]  # (B, P, 2, H_kv, G, D)
    k, v = (x[:, :, i].permute(0, 2, 1, 3, 4).reshape(b, hkv, -1, d) for i in (0, 1))
    for (t, length), tma in itertools.product(((10, 50), (16, 96), (1, 33), (40, 40)), (False, True)):
        q = torch.randn(b, hq, t, d, generator=gen).to(device)
        out, lse = flash_prefill.paged_chunk_attention_triton(q, pool, rows, length, 0.3, with_lse=True, tma=tma)
        ref, ref_lse = flash_prefill.chunk_attention_reference(
            q, k[:, :, :length], v[:, :, :length], 0.3, with_lse=True
        )
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("check", [check_against_twin, check_pages_against_twin], ids=["contiguous", "paged"])
def test_the_kernel_equals_its_torch_twin(device, check):
    check_kernel(check, device)


@pytest.mark.parametrize("b,hq,hkv,t,s,d", CASES)
def test_the_twin_equals_sdpa_aligned_to_the_lower_right(b, hq, hkv, t, s, d):
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = _qkv(b, hq, hkv, t, s, d, "cpu", torch.float32, 1)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(t, s), scale=0.3, enable_gqa=True)
    out, lse = flash_prefill.chunk_attention_reference(q, k, v, 0.3, with_lse=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flash_prefill.chunk_attention_reference(q, k, v, 0.3), want, rtol=1e-5, atol=1e-5)


def test_unsupported_shapes_are_refused_with_the_reason():
    q, k, v = _qkv(1, 4, 2, 8, 16, 24, "cpu", torch.float32, 0)  # D = 24: not a power of two
    assert not flash_prefill.supported(q, k)
    with pytest.raises(Exception, match="does not take"):
        flash_prefill.chunk_attention_triton(q, k, v, 0.3)


def test_chunk_attention_takes_the_kernel_only_on_cuda(monkeypatch):
    """On the CPU ``KVDRIVE_PREFILL_KERNEL=triton`` keeps torch's path (the interpreter is for tests)."""
    monkeypatch.setenv("KVDRIVE_PREFILL_KERNEL", "triton")
    called = []
    monkeypatch.setattr(flash_prefill, "chunk_attention_triton", lambda *a, **k: called.append(1))
    q, k, v = _qkv(1, 4, 2, 8, 24, 16, "cpu", torch.float32, 0)
    chunk_attention(q, k, v, 16, LayerSpec(window=None, scale=0.25))
    assert called == []


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("prefix,t", [(0, 2048), (30_000, 2048), (12_345, 300)])
def test_chunk_attention_through_the_kernel_matches_sdpa_in_bf16(monkeypatch, d, prefix, t):
    """Within twice torch's flash error against fp32, plus one bf16 rounding of P."""
    gen = torch.Generator().manual_seed(prefix + t)
    q = torch.randn(1, 32, t, d, generator=gen).cuda().bfloat16()
    k, v = (x.cuda().bfloat16() for x in torch.randn(2, 1, 8, prefix + t, d, generator=gen))
    spec = LayerSpec(window=None, scale=d**-0.5)
    monkeypatch.setenv("KVDRIVE_PREFILL_KERNEL", "triton")
    got = chunk_attention(q, k, v, prefix, spec)
    monkeypatch.setenv("KVDRIVE_PREFILL_KERNEL", "flash")
    flash = chunk_attention(q, k, v, prefix, spec)
    ref = flash_prefill.chunk_attention_reference(q.float(), k.float(), v.float(), spec.scale)
    err, base = (got.float() - ref).abs().max(), (flash.float() - ref).abs().max()
    assert err <= 2 * base + 2**-8 * ref.abs().max(), (err, base)


@pytest.mark.gpu
def test_the_paged_cache_prefills_through_the_kernel_as_through_flash(monkeypatch):
    """A prompt prefilled in chunks by the paged cache, pages read in place by the kernel, then
    decoded: the logits match the flash path's (bf16; the decode tolerance of test_paged)."""
    from factories import decode_steps, random_prompts, tiny_model

    from kvdrive.cache.paged import PagedKVCache

    model = tiny_model().to("cuda", torch.bfloat16)
    prompts = random_prompts((150, 77, 240))
    logits = {}
    for kernel in ("flash", "triton"):
        monkeypatch.setenv("KVDRIVE_PREFILL_KERNEL", kernel)
        cache = PagedKVCache(model.config, 3, 400, torch.device("cuda"), torch.bfloat16, page_tokens=64)
        logits[kernel] = decode_steps(model, cache, prompts, 8).float()
    want, got = logits["flash"], logits["triton"]
    assert float((got - want).norm() / want.norm()) < 2e-2
