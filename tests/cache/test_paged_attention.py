"""Split-KV decode over the paged cache's pages: the Triton kernel equals the torch twin, and
both equal plain SDPA over each sequence's contiguous keys (windows, softcap, GQA, ragged)."""

import pytest
import torch
from conftest import KERNEL_DEVICES, check_kernel

from kvdrive.cache.base import LayerSpec
from kvdrive.cache.contiguous import sdpa
from kvdrive.cache.paged import paged_decode


def make_case(lens, h_q, h_kv, d, g, dtype=torch.float32, seed=0, device="cpu"):
    """Per-sequence K/V (H_kv, L, D), the same tokens scattered over a shuffled page pool, and a
    page table (B, P) one column wider than the longest sequence needs (never read)."""
    gen = torch.Generator().manual_seed(seed)
    ks = [torch.randn(h_kv, n, d, generator=gen) for n in lens]
    vs = [torch.randn(h_kv, n, d, generator=gen) for n in lens]
    q = torch.randn(len(lens), h_q, d, generator=gen)
    pages = [-(-n // g) for n in lens]
    order = torch.randperm(sum(pages) + 2, generator=gen)  # two pages nobody holds
    pool = torch.randn(len(order), 2, h_kv, g, d, generator=gen)  # garbage where nothing was written
    rows = torch.zeros(len(lens), max(pages) + 1, dtype=torch.int32)
    used = 0
    for b, (k, v) in enumerate(zip(ks, vs)):
        for i in range(pages[b]):
            p, toks = int(order[used]), slice(i * g, min((i + 1) * g, lens[b]))
            n = toks.stop - toks.start
            pool[p, 0, :, :n], pool[p, 1, :, :n] = k[:, toks], v[:, toks]
            rows[b, i] = p
            used += 1
    to = dict(device=device, dtype=dtype)
    return q.to(**to), [k.to(**to) for k in ks], [v.to(**to) for v in vs], pool.to(**to), rows.to(device)


def sdpa_reference(q, ks, vs, spec: LayerSpec):
    """The new token (last position) of each sequence through exact SDPA in float32."""
    outs = []
    for b, (k, v) in enumerate(zip(ks, vs)):
        n = k.shape[1]
        mask = torch.ones(1, 1, 1, n, dtype=torch.bool, device=q.device)
        if spec.window is not None:
            mask[..., : max(0, n - spec.window)] = False
        out = sdpa(q[b, None, :, None].float(), k[None].float(), v[None].float(), mask, spec.scale, spec.softcap)
        outs.append(out[0, :, 0])
    return torch.stack(outs)  # (B, H_q, D)


# (lens, h_q, h_kv, d, g, window, softcap): GQA ratios 1, 4 and 8; lengths off every page and
# block boundary; one token; windows that cut keys, one that does not, and a window of 1;
# enough pages for several partitions, some wholly before the window.
CPU_CASES = [
    ([1, 13, 203], 2, 2, 16, 8, None, None),
    ([250, 70, 16], 4, 1, 32, 16, 50, None),
    ([97, 5], 8, 1, 16, 4, 20, 5.0),
    ([3, 66, 130], 8, 2, 16, 8, 1, None),
    ([129, 40], 4, 1, 16, 8, 500, 2.0),
]


def check_paged_decode(device, cases=CPU_CASES, dtype=torch.float32, tol=1e-5):
    for i, (lens, h_q, h_kv, d, g, window, softcap) in enumerate(cases):
        q, ks, vs, pool, rows = make_case(lens, h_q, h_kv, d, g, dtype, seed=i, device=device)
        spec = LayerSpec(window=window, scale=d**-0.5, softcap=softcap)
        lengths = torch.tensor(lens, device=device)
        want = sdpa_reference(q, ks, vs, spec)
        twin = paged_decode(q, pool, rows, lengths, spec, impl="torch")
        got = paged_decode(q, pool, rows, lengths, spec, impl="triton")
        assert got.dtype == dtype and got.shape == q.shape
        for name, out in (("twin", twin), ("triton", got)):
            err = float((out.float() - want).norm() / want.norm())
            assert err < tol, (i, name, err)
        torch.testing.assert_close(got.float(), twin.float(), rtol=tol * 10, atol=tol * 10)


def test_twin_equals_sdpa():
    for i, (lens, h_q, h_kv, d, g, window, softcap) in enumerate(CPU_CASES):
        q, ks, vs, pool, rows = make_case(lens, h_q, h_kv, d, g, seed=i)
        spec = LayerSpec(window=window, scale=d**-0.5, softcap=softcap)
        got = paged_decode(q, pool, rows, torch.tensor(lens), spec, impl="torch")
        torch.testing.assert_close(got, sdpa_reference(q, ks, vs, spec), rtol=1e-5, atol=1e-5)


# The Llama-3.1-8B and Gemma 3 shapes on the GPU, bf16, lengths across many partitions.
GPU_CASES = [
    ([1, 63, 64, 4097, 33000], 32, 8, 128, 64, None, None),
    ([1000, 70000], 32, 8, 128, 64, 4096, None),
    ([777, 5000], 8, 4, 256, 64, 1024, 50.0),
    ([2049, 12345], 16, 16, 64, 64, None, None),
]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_triton_equals_twin_and_sdpa(device):
    check_kernel(check_paged_decode, device)


@pytest.mark.gpu
def test_triton_bf16_on_gpu():
    # bf16 inputs for all three; the kernel multiplies P (cast to bf16, relative rounding 2**-9)
    # by V and rounds its output to bf16 (2**-9 again), against the float32 softmax of the same
    # bf16 inputs: a relative error of a few 1e-3 in norm, so 1e-2 leaves a margin of about 2.5x.
    check_paged_decode("cuda", GPU_CASES, torch.bfloat16, tol=1e-2)
