"""``tokenmax`` summaries: 2-bit token keys within the group's range, scored by the best token."""

import pytest
import torch
from conftest import KERNEL_DEVICES, check_kernel

from kvdrive.errors import KvdriveError
from kvdrive.retrieval import token_summary
from kvdrive.retrieval.summaries import SummaryTable, make_summarizer


def test_decode_is_within_half_a_step_of_every_key():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(5, 3, 16, 64, generator=gen) * torch.linspace(0.1, 8, 64)  # channels of different scale
    out = token_summary.decode(token_summary.encode(keys), 16, 64)
    lo, hi = keys.amin(2, keepdim=True), keys.amax(2, keepdim=True)
    step = (hi - lo) / token_summary.LEVELS
    assert out.shape == keys.shape
    # half a step, plus the float16 rounding of the range
    assert ((out - keys).abs() <= step / 2 + 2e-3 * hi.abs().clamp(min=1)).all()
    assert torch.equal(out.amin(2), lo.half().float().squeeze(2))  # the extremes are exact codes


def test_constant_group_decodes_exactly():
    keys = torch.full((1, 2, 16, 8), 1.5)
    assert torch.equal(token_summary.decode(token_summary.encode(keys), 16, 8), keys)


def test_summary_is_a_quarter_of_a_bf16_key_per_token():
    s = make_summarizer("tokenmax", 8, 128, 16)
    assert s.bytes_per_group(torch.bfloat16) / 16 == 8 * 128 // 2  # D/2 bytes per token and head
    assert s.storage_dtype(torch.bfloat16) == torch.uint8
    with pytest.raises(KvdriveError, match="divisible"):
        make_summarizer("tokenmax", 1, 3, 1).summary_shape  # noqa: B018


def test_a_spike_token_outranks_groups_of_higher_mean():
    """A group whose one token matches the query wins over groups whose mean logit is higher:
    the case that mean summaries lose (a pass key's value among recent text)."""
    d, g = 64, 16
    q = torch.zeros(1, 1, d)
    q[0, 0, 0] = 1.0
    keys = torch.zeros(3, 1, g, d)
    keys[0, 0, :, 0] = 0.3  # every token a little aligned: mean 0.3
    keys[1, 0, :, 0] = 0.25
    keys[2, 0, 5, 0] = 2.0  # one token strongly aligned: mean 0.125, max 2.0
    keys += 0.01 * torch.randn(keys.shape, generator=torch.Generator().manual_seed(1))
    for name, best in (("mean", 0), ("tokenmax", 2)):
        s = make_summarizer(name, 1, d, g)
        scores = s.score(q, s.summarize(keys)[None], None, 1.0, impl="torch")
        assert int(scores[0, 0].argmax()) == best, name


def test_tokenlse_scores_a_group_by_its_estimated_attention_mass():
    """tokenlse is logsumexp(scale * q.k) / scale over the group's dequantized keys: several
    matching tokens outrank one that matches as well, and it never falls below tokenmax's score."""
    d, g, scale = 64, 16, 0.5
    q = torch.zeros(1, 1, d)
    q[0, 0, 0] = 1.0
    keys = torch.zeros(2, 1, g, d)
    keys[0, 0, 3, 0] = 4.0  # one token matches
    keys[1, 0, 3:7, 0] = 4.0  # four tokens match as well
    lse, best = make_summarizer("tokenlse", 1, d, g), make_summarizer("tokenmax", 1, d, g)
    s_lse = lse.score(q, lse.summarize(keys)[None], None, scale, impl="torch")[0, 0]
    s_max = best.score(q, best.summarize(keys)[None], None, scale, impl="torch")[0, 0]
    assert s_max[0] == s_max[1] and s_lse[1] > s_lse[0]
    assert (s_lse >= s_max).all()
    decoded = token_summary.decode(lse.summarize(keys), g, d)  # (2, 1, G, D)
    want = torch.logsumexp(scale * decoded[:, 0, :, 0], dim=-1)  # the score is in scaled units
    torch.testing.assert_close(s_lse, want)


def test_table_stores_bytes():
    s = make_summarizer("tokenmax", 2, 16, 4)
    table = SummaryTable(s, 2, 10, "cpu", torch.float32)
    keys = torch.randn(3, 2, 4, 16)
    table.write(1, torch.tensor([0, 1, 2]), keys)
    assert table.data.dtype == torch.uint8 and table.counts.tolist() == [0, 3]
    torch.testing.assert_close(
        token_summary.decode(table.data[1, :3], 4, 16), token_summary.decode(token_summary.encode(keys), 4, 16)
    )


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_token_score_kernel_matches_the_torch_path(device):
    """The Triton score equals the torch twin: max and mean over query heads, ragged counts."""
    check_kernel(check_token_score, device)


def check_token_score(device: str) -> None:
    gen = torch.Generator().manual_seed(4)
    for h_kv, r, d, g, n, reduce, name in (
        (2, 4, 16, 16, 37, "max", "tokenmax"),
        (1, 4, 64, 16, 20, "mean", "tokenmax"),
        (3, 3, 64, 8, 9, "max", "tokenmax"),
        (1, 4, 256, 16, 5, "max", "tokenmax"),
        (8, 4, 128, 16, 40, "max", "tokenmax"),
        (2, 4, 16, 16, 37, "max", "tokenlse"),
        (3, 3, 64, 8, 9, "mean", "tokenlse"),
        (8, 4, 128, 16, 40, "max", "tokenlse"),
    ):
        s = make_summarizer(name, h_kv, d, g)
        b = 3
        keys = torch.randn(b * n, h_kv, g, d, generator=gen)
        summ = s.summarize(keys).view(b, n, *s.summary_shape).to(device)
        summ = torch.cat((summ, torch.zeros_like(summ[:, :5])), dim=1)[:, :n]  # rows of a padded table
        q = torch.randn(b, h_kv * r, d, generator=gen).to(device)
        counts = torch.tensor([n, n - 7, 1], device=device)
        want = s.score(q, summ, None, 0.3, head_reduce=reduce, counts=counts, impl="torch")
        got = s.score(q, summ, None, 0.3, head_reduce=reduce, counts=counts, impl="triton")
        assert got.shape == want.shape == (b, h_kv, n) and got.dtype == torch.float32
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        finite = torch.isfinite(want)
        # fp16 keys and queries meet in the kernel's dot: an fp16 rounding of each operand
        torch.testing.assert_close(got[finite], want[finite], rtol=2e-2, atol=2e-2 * want[finite].abs().max().item())


def test_oracle_ranks_groups_by_their_true_attention_share():
    gen = torch.Generator().manual_seed(2)
    keys = torch.randn(1, 12, 2, 16, 8, generator=gen)  # (B, N, H_kv, G, D)
    q = torch.randn(1, 4, 8, generator=gen)
    s = make_summarizer("oracle", 2, 8, 16)
    scores = s.score(q, s.summarize(keys.view(12, 2, 16, 8)).view(1, 12, 2, 16, 8), None, 0.5)  # (1, H_kv, N)
    logits = torch.einsum("hrd,nhgd->hrng", q.view(2, 2, 8), keys[0]) * 0.5  # (H_kv, R, N, G)
    share = logits.flatten(2).softmax(-1).view(2, 2, 12, 16).sum(-1)  # (H_kv, R, N)
    torch.testing.assert_close(scores[0].exp(), share.amax(1))
    counts = torch.tensor([5])
    masked = s.score(q, s.summarize(keys.view(12, 2, 16, 8)).view(1, 12, 2, 16, 8), None, 0.5, counts=counts)
    assert torch.isinf(masked[0, :, 5:]).all() and torch.isfinite(masked[0, :, :5]).all()
