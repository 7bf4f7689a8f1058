"""Group summaries: bounds, scores, low-rank fits, the padded table, the registry."""

import pytest
import torch
from conftest import KERNEL_DEVICES, check_kernel

from kvdrive.errors import KvdriveError
from kvdrive.retrieval.lowrank import KeyGram, load_bases, save_bases
from kvdrive.retrieval.summaries import SUMMARIZERS, SummaryTable, make_summarizer

H_KV, D, G = 2, 16, 4


def keys_and_query(n=12, b=1, h_q=4, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, n, H_KV, G, D, generator=gen).to(dtype)  # (B, N, H_kv, G, D)
    q = torch.randn(b, h_q, D, generator=gen).to(dtype)
    return keys, q


def exact_group_max(q, keys, scale):
    """(B, H_kv, N): max over the group's tokens and the KV group's query heads of scale * q.k."""
    b, h_q, d = q.shape
    q4 = q.float().view(b, H_KV, h_q // H_KV, d)  # (B, H_kv, R, D)
    logits = torch.einsum("bjrd,bnjgd->bjrng", q4, keys.float())  # (B, H_kv, R, N, G)
    return logits.amax(dim=(2, 4)) * scale


@pytest.mark.parametrize("seed", range(5))
def test_minmax_score_is_an_upper_bound_of_every_token(seed):
    keys, q = keys_and_query(seed=seed, b=2)
    s = make_summarizer("minmax", H_KV, D, G)
    summ = torch.stack([s.summarize(k) for k in keys])  # (B, N, H_kv, 2D)
    scores = s.score(q, summ, None, scale=0.5)
    exact = exact_group_max(q, keys, 0.5)
    assert torch.all(scores >= exact - 1e-5)


def test_mean_score_is_the_mean_logit():
    keys, q = keys_and_query(h_q=2)
    s = make_summarizer("mean", H_KV, D, G)
    scores = s.score(q, s.summarize(keys[0])[None], None, scale=1.0, head_reduce="mean")
    expect = torch.einsum("bjd,bnjgd->bjng", q.float(), keys.float()).mean(-1)  # R = 1
    torch.testing.assert_close(scores, expect, rtol=1e-5, atol=1e-5)


def test_full_rank_basis_scores_exactly():
    keys, q = keys_and_query(n=20, b=1, seed=3)
    gram = KeyGram(H_KV, D)
    gram.add(keys[0])  # group-shaped input
    basis = gram.basis(H_KV * D)
    assert torch.allclose(basis.T @ basis, torch.eye(H_KV * D), atol=1e-5)
    s = make_summarizer("lowrank_offline", H_KV, D, G, basis=basis)
    scores = s.score(q, s.summarize(keys[0])[None], None, scale=0.3)
    torch.testing.assert_close(scores, exact_group_max(q, keys, 0.3), rtol=1e-4, atol=1e-4)
    assert gram.captured(H_KV * D) == pytest.approx(1.0)


def test_low_rank_keys_are_recovered_by_a_basis_of_that_rank():
    gen = torch.Generator().manual_seed(4)
    mix = torch.randn(3, H_KV * D, generator=gen)
    keys = (torch.randn(1, 30, G, 3, generator=gen) @ mix).view(1, 30, G, H_KV, D).transpose(2, 3)  # rank 3
    q = torch.randn(1, 4, D, generator=gen)
    gram = KeyGram(H_KV, D)
    gram.add(keys[0])
    assert gram.captured(3) > 0.9999
    s = make_summarizer("lowrank_offline", H_KV, D, G, basis=gram.basis(3))
    torch.testing.assert_close(
        s.score(q, s.summarize(keys[0])[None], None, 1.0), exact_group_max(q, keys, 1.0), rtol=1e-3, atol=1e-3
    )


def test_per_sequence_bases_are_used_per_row():
    keys, q = keys_and_query(n=10, b=2, seed=5)
    s = make_summarizer("lowrank_seq", H_KV, D, G, rank=H_KV * D, max_seqs=3)
    for row in (0, 2):
        s.fit(row, keys[row // 2].transpose(1, 2).reshape(-1, H_KV, D))  # (T, H_kv, D)
    rows = torch.tensor([0, 2])
    summ = torch.stack([s.summarize(keys[i], rows[i].expand(10)) for i in range(2)])  # (B, N, G, r)
    scores = s.score(q, summ, None, 0.7, rows=rows)
    torch.testing.assert_close(scores, exact_group_max(q, keys, 0.7), rtol=1e-4, atol=1e-4)
    assert s.bytes_per_sequence(torch.bfloat16) == H_KV * D * H_KV * D * 2
    with pytest.raises(ValueError, match="row"):
        s.score(q, summ, None, 1.0)


def test_padding_groups_score_minus_inf():
    keys, q = keys_and_query(n=6, b=2)
    s = make_summarizer("minmax", H_KV, D, G)
    summ = torch.stack([s.summarize(k) for k in keys])
    valid = torch.arange(6)[None, :] < torch.tensor([[6], [2]])
    scores = s.score(q, summ, valid, 1.0)
    assert scores.shape == (2, H_KV, 6) and scores.dtype == torch.float32
    assert torch.all(scores[1, :, 2:] == float("-inf")) and torch.isfinite(scores[0]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_summaries_score_close_to_fp32(dtype):
    keys, q = keys_and_query(n=8, seed=6)
    for name in ("minmax", "mean"):
        s = make_summarizer(name, H_KV, D, G)
        ref = s.score(q, s.summarize(keys[0])[None], None, 1.0)
        half = s.score(q.to(dtype), s.summarize(keys[0].to(dtype))[None], None, 1.0)
        torch.testing.assert_close(half, ref, rtol=3e-2, atol=5e-2)


def test_bytes_per_group():
    basis = torch.linalg.qr(torch.randn(H_KV * D, 8))[0]
    sizes = {
        "minmax": make_summarizer("minmax", H_KV, D, G).bytes_per_group(torch.bfloat16),
        "mean": make_summarizer("mean", H_KV, D, G).bytes_per_group(torch.bfloat16),
        "lowrank_offline": make_summarizer("lowrank_offline", H_KV, D, G, basis=basis).bytes_per_group(torch.bfloat16),
    }
    assert sizes == {"minmax": 2 * H_KV * D * 2, "mean": H_KV * D * 2, "lowrank_offline": G * 8 * 2}


def test_registry_and_errors():
    assert set(SUMMARIZERS) == {"minmax", "mean", "lowrank_offline", "lowrank_seq", "tokenmax", "tokenlse", "oracle"}
    with pytest.raises(KvdriveError, match="unknown summary"):
        make_summarizer("bogus", H_KV, D, G)
    with pytest.raises(KvdriveError, match="basis"):
        make_summarizer("lowrank_offline", H_KV, D, G, basis=torch.zeros(5, 2))
    s = make_summarizer("mean", H_KV, D, G)
    with pytest.raises(KvdriveError, match="head_reduce"):
        s.score(torch.zeros(1, 2, D), torch.zeros(1, 3, H_KV, D), None, 1.0, head_reduce="median")


def test_table_writes_scattered_groups_and_counts():
    keys, _ = keys_and_query(n=5, b=1)
    s = make_summarizer("minmax", H_KV, D, G)
    table = SummaryTable(s, max_seqs=3, max_groups=8, device="cpu", dtype=torch.float32)
    rows, groups = torch.tensor([2, 2, 0, 2]), torch.tensor([0, 1, 0, 2])
    table.write(rows, groups, keys[0, :4])
    assert table.counts.tolist() == [1, 0, 3]
    torch.testing.assert_close(table.data[2, 1], s.summarize(keys[0, 1:2])[0])
    table.write(1, torch.arange(5), keys[0])  # one sequence's prefill, int row
    assert table.counts.tolist() == [1, 5, 3]
    assert table.valid(3).sum(1).tolist() == [1, 5, 3]
    assert table.nbytes == 3 * 8 * H_KV * 2 * D * 4
    table.reset(2)
    assert table.counts.tolist() == [1, 5, 0]


def test_bases_round_trip(tmp_path):
    bases = {0: torch.randn(32, 4), 3: torch.randn(32, 4)}
    save_bases(tmp_path / "b.pt", bases, {"model": "x", "rank": 4})
    back, meta = load_bases(tmp_path / "b.pt")
    assert meta["rank"] == 4 and torch.equal(back[3], bases[3])


def test_lowrank_seq_prefill_in_chunks_equals_one_shot():
    gen = torch.Generator().manual_seed(7)
    keys = torch.randn(300, H_KV, G, D, generator=gen)  # more groups than one gather chunk
    s = make_summarizer("lowrank_seq", H_KV, D, G, rank=8, max_seqs=2)
    s.fit(1, keys)
    chunked = s.summarize(keys, torch.ones(300, dtype=torch.int64))
    torch.testing.assert_close(chunked, s.summarize(keys, 1))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_fused_score_kernel_matches_the_torch_path(device):
    """The one-launch Triton score gives the torch path's scores: minmax and mean summaries,
    max and mean over query heads, ragged counts (-inf past each row's count)."""
    check_kernel(check_fused_score, device)


def check_fused_score(device: str) -> None:
    gen = torch.Generator().manual_seed(3)
    for name, h_kv, r, d, n, dtype, reduce in (
        ("minmax", 2, 4, 16, 70, torch.float32, "max"),
        ("mean", 2, 2, 16, 130, torch.float32, "mean"),
        ("minmax", 8, 4, 128, 300, torch.bfloat16, "max"),
        ("minmax", 4, 1, 64, 65, torch.bfloat16, "mean"),
    ):
        s = make_summarizer(name, h_kv, d, G)
        b = 3
        keys = torch.randn(b * n, h_kv, G, d, generator=gen)
        summ = s.summarize(keys).view(b, n, *s.summary_shape).to(device, dtype)
        # a padded table's view: rows of a larger table (stride over N_cap), as the caches pass it
        summ = torch.cat((summ, torch.zeros_like(summ[:, :5])), dim=1)[:, :n]
        q = torch.randn(b, h_kv * r, d, generator=gen).to(device, dtype)
        counts = torch.tensor([n, n - 7, 1], device=device)
        want = s.score(q, summ, None, 0.3, head_reduce=reduce, counts=counts, impl="torch")
        got = s.score(q, summ, None, 0.3, head_reduce=reduce, counts=counts, impl="triton")
        assert got.shape == want.shape == (b, h_kv, n) and got.dtype == torch.float32
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        assert torch.isinf(got[1, :, n - 7 :]).all() and torch.isinf(got[2, :, 1:]).all()
        finite = torch.isfinite(want)
        # float32: the same sum in another order; bf16: one dtype rounding of the dot product, as the GEMM
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got[finite], want[finite], rtol=tol, atol=tol)
        if device == "cuda" and dtype == torch.bfloat16:  # the GPU rounds as cuBLAS's output does
            assert (got[finite] == want[finite]).float().mean() > 0.95, name
