"""Sparse paged attention: the reference against full attention, LSE merge, Triton against the reference."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kvdrive
from kvdrive.retrieval import all_pages, merge_attention, merge_attention_many, paginate, sparse_attention
from kvdrive.retrieval.sparse_attention import plan_splits, triton_available
from kvdrive.retrieval.sparse_attention_ref import sparse_attention_ref

ROOT = Path(kvdrive.__file__).resolve().parents[1]  # the checkout: the subprocess imports kvdrive from it


def make_case(lens, h_q=8, h_kv=2, d=32, g=4, dtype=torch.float32, seed=0, device="cpu"):
    """Random per-sequence K/V (H_kv, T, D), a shuffled pool, and one decode query per sequence."""
    gen = torch.Generator().manual_seed(seed)
    ks = [torch.randn(h_kv, t, d, generator=gen).to(device, dtype) for t in lens]
    vs = [torch.randn(h_kv, t, d, generator=gen).to(device, dtype) for t in lens]
    q = torch.randn(len(lens), h_q, d, generator=gen).to(device, dtype)
    return q, ks, vs, paginate(ks, vs, g, shuffle=gen)


def full_attention(q, ks, vs, scale, softcap=None):
    """The last row of causal attention over each whole sequence, float32, GQA by repetition."""
    outs, lses = [], []
    for b, (k, v) in enumerate(zip(ks, vs)):
        rep = q.shape[1] // k.shape[0]
        kf, vf = k.float().repeat_interleave(rep, 0), v.float().repeat_interleave(rep, 0)  # (H_q, T, D)
        qb = q[b].float()[:, None]  # (H_q, 1, D)
        if softcap is None:
            outs.append(F.scaled_dot_product_attention(qb, kf, vf, scale=scale)[:, 0])
        else:
            logits = softcap * torch.tanh(qb @ kf.mT * scale / softcap)
            outs.append((torch.softmax(logits, -1) @ vf)[:, 0])
        logits = qb @ kf.mT * scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        lses.append(torch.logsumexp(logits, -1)[:, 0])
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_reference_with_every_group_equals_full_attention(softcap):
    lens = [1, 4, 13, 30]  # odd lengths: last_page_len != G; one sequence of one token
    q, ks, vs, paged = make_case(lens)
    pt, npg = all_pages(paged, 2)
    out, lse = sparse_attention_ref(q, paged.kv_pool, pt, npg, paged.last_page_len, 32**-0.5, softcap)
    ref_out, ref_lse = full_attention(q, ks, vs, 32**-0.5, softcap)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_half_precision_accumulates_in_fp32(dtype):
    q, ks, vs, paged = make_case([37, 64], dtype=dtype, seed=1)
    pt, npg = all_pages(paged, 2)
    out, lse = sparse_attention_ref(q, paged.kv_pool, pt, npg, paged.last_page_len, 0.2)
    ref_out, ref_lse = full_attention(q, ks, vs, 0.2)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_subset_of_pages_equals_attention_over_those_tokens():
    q, ks, vs, paged = make_case([40], seed=2)  # 10 groups of 4
    chosen = [[0, 3, 7, 9], [1, 2, 9, 0]]  # per KV head; head 1 lists 3 pages + padding
    pt = torch.stack([paged.slot_table[0, c] for c in chosen])[None].to(torch.int32)  # (1, 2, 4)
    npg = torch.tensor([[4, 3]], dtype=torch.int32)
    last = torch.tensor([4], dtype=torch.int32)
    out, lse = sparse_attention_ref(q, paged.kv_pool, pt, npg, last, 0.3)
    for j, c in enumerate(chosen):
        toks = torch.cat([torch.arange(4 * g, 4 * g + 4) for g in c[: npg[0, j]]])
        ref_out, ref_lse = full_attention(
            q[:, 4 * j : 4 * j + 4], [ks[0][j : j + 1, toks]], [vs[0][j : j + 1, toks]], 0.3
        )
        torch.testing.assert_close(out[:, 4 * j : 4 * j + 4], ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[:, 4 * j : 4 * j + 4], ref_lse, rtol=1e-5, atol=1e-5)


def test_empty_selection_gives_zero_and_minus_inf():
    q, _, _, paged = make_case([8])
    pt = torch.zeros(1, 2, 1, dtype=torch.int32)
    out, lse = sparse_attention_ref(
        q, paged.kv_pool, pt, torch.zeros(1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0
    )
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_merge_of_two_halves_equals_whole():
    q, ks, vs, paged = make_case([23, 40], seed=3)
    pt, npg = all_pages(paged, 2)  # (2, 2, 10)
    whole = sparse_attention_ref(q, paged.kv_pool, pt, npg, paged.last_page_len, 0.25)
    full = torch.full((2,), 4, dtype=torch.int32)
    first = sparse_attention_ref(
        q, paged.kv_pool, pt[:, :, :3].contiguous(), torch.full((2,), 3, dtype=torch.int32), full, 0.25
    )
    rest = sparse_attention_ref(q, paged.kv_pool, pt[:, :, 3:].contiguous(), npg - 3, paged.last_page_len, 0.25)
    out, lse = merge_attention(first[0], first[1], rest[0], rest[1])
    torch.testing.assert_close(out, whole[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, whole[1], rtol=1e-5, atol=1e-5)
    empty = (torch.zeros_like(out), torch.full_like(lse, float("-inf")))
    out3, lse3 = merge_attention_many(torch.stack([out, empty[0]]), torch.stack([lse, empty[1]]))
    torch.testing.assert_close(out3, out)
    torch.testing.assert_close(lse3, lse)


def test_shape_checks():
    q, _, _, paged = make_case([8])
    pt, npg = all_pages(paged, 2)
    with pytest.raises(ValueError, match="int32"):
        sparse_attention_ref(q, paged.kv_pool, pt.long(), npg, paged.last_page_len, 1.0)
    with pytest.raises(ValueError, match="KV heads"):
        sparse_attention_ref(q[:, :3], paged.kv_pool, pt, npg, paged.last_page_len, 1.0)


def test_split_plan_covers_every_page():
    for b, h, p, pages, sms in [(1, 8, 128, 4, 132), (16, 8, 8192, 4, 132), (2, 1, 1, 16, 4), (64, 8, 10, 4, 132)]:
        splits, per = plan_splits(b, h, p, pages, sms)
        assert per % pages == 0 and splits * per >= p and (splits - 1) * per < p


def check_triton_against_reference(device, cases):
    """Runs Triton and the reference on each case; returns the worst relative error of out and
    the worst absolute error of lse. Shared by the interpreter test and the GPU test."""
    from kvdrive.retrieval.sparse_attention import sparse_attention_triton

    worst = [0.0, 0.0]
    for c in cases:
        q, _, _, paged = make_case(c["lens"], c["h_q"], c["h_kv"], c["d"], c["g"], c["dtype"], c.get("seed", 0), device)
        pt, npg = all_pages(paged, c["h_kv"])
        if c.get("per_head"):  # odd KV heads skip page 1 where a sequence has > 2 pages
            drop = (npg > 2)[:, None, None] & (torch.arange(c["h_kv"], device=device) % 2 == 1)[None, :, None]
            shifted = torch.cat([pt[:, :, :1], pt[:, :, 2:], pt[:, :, :1]], dim=-1)  # (B, H_kv, P)
            pt = torch.where(drop, shifted, pt).contiguous()
            npg = (npg[:, None] - drop[:, :, 0].int()).contiguous()  # (B, H_kv)
        args = (q, paged.kv_pool, pt, npg, paged.last_page_len, c["d"] ** -0.5, c.get("softcap"))
        ref_out, ref_lse = sparse_attention_ref(*args)
        for kw in c.get("variants", [{}]):
            out, lse = sparse_attention_triton(*args, **kw)
            err = (out.float() - ref_out.float()).norm() / ref_out.float().norm()
            worst[0] = max(worst[0], float(err))
            worst[1] = max(worst[1], float((lse - ref_lse).abs().max()))
            assert torch.isfinite(out).all()
    return worst


SMALL_CASES = [
    dict(
        lens=[5, 16, 37],
        h_q=8,
        h_kv=2,
        d=32,
        g=4,
        dtype=torch.float32,
        variants=[{}, {"num_splits": 1, "block_tokens": 8}, {"num_splits": 3, "block_tokens": 4}],
    ),
    dict(lens=[9, 24], h_q=4, h_kv=4, d=24, g=8, dtype=torch.float32, softcap=2.0, per_head=True),
    dict(lens=[33], h_q=6, h_kv=2, d=16, g=16, dtype=torch.bfloat16),
]


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_kernel_matches_reference_under_interpreter():
    # TRITON_INTERPRET must be set before the kernel module is imported: use a fresh process.
    code = textwrap.dedent(f"""
        import importlib.util, torch
        spec = importlib.util.spec_from_file_location("t", {str(Path(__file__).resolve())!r})
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
        out_err, lse_err = m.check_triton_against_reference("cpu", m.SMALL_CASES)
        assert out_err < 1e-2 and lse_err < 1e-3, (out_err, lse_err)
        print("ok", out_err, lse_err)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


GPU_CASES = [
    # Llama-3.1-8B attention shape, odd lengths, a long sequence beside short ones
    dict(
        lens=[1, 17, 300, 4099],
        h_q=32,
        h_kv=8,
        d=128,
        g=16,
        dtype=torch.bfloat16,
        variants=[{}, {"block_tokens": 32}, {"block_tokens": 128}, {"num_splits": 1}],
    ),
    dict(lens=[1000, 2048, 33], h_q=32, h_kv=8, d=128, g=16, dtype=torch.float16, per_head=True),
    dict(lens=[517, 64], h_q=32, h_kv=8, d=128, g=16, dtype=torch.float32),
    dict(lens=[777, 5], h_q=8, h_kv=4, d=256, g=4, dtype=torch.bfloat16, softcap=50.0),  # Gemma-like
    dict(lens=[12345], h_q=28, h_kv=4, d=128, g=32, dtype=torch.bfloat16, seed=5),  # Qwen2-7B heads: R = 7
]


@pytest.mark.gpu
def test_triton_kernel_matches_reference_on_gpu():
    if not triton_available():
        pytest.skip("triton not installed")
    out_err, lse_err = check_triton_against_reference("cuda", GPU_CASES)
    print(f"triton vs reference on GPU: out rel err {out_err:.2e}, lse max abs err {lse_err:.2e}")
    assert out_err < 1e-2 and lse_err < 1e-3, (out_err, lse_err)


@pytest.mark.gpu
def test_dispatch_auto_uses_triton_on_gpu_and_agrees():
    q, ks, vs, paged = make_case([100, 3000], 32, 8, 128, 16, torch.bfloat16, device="cuda")
    pt, npg = all_pages(paged, 8)
    out, lse = sparse_attention(q, paged.kv_pool, pt, npg, paged.last_page_len, 128**-0.5)
    ref_out, ref_lse = full_attention(q, ks, vs, 128**-0.5)
    assert float((out.float() - ref_out).norm() / ref_out.norm()) < 1e-2
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)
