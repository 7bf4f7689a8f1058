"""Selection under a budget, and next-layer prediction with its recall metric."""

import pytest
import torch
from conftest import run_interpreted
from torch import nn

from kvdrive.errors import KvdriveError
from kvdrive.retrieval import Budget, SelectionConfig, all_pages, paginate, select_groups, selection_mask
from kvdrive.retrieval.predict import forced_mask, predict_query, recall
from kvdrive.retrieval.select import _select_kernel, combine_heads, select_groups_keyed
from kvdrive.retrieval.sparse_attention_ref import sparse_attention_ref
from kvdrive.retrieval.summaries import make_summarizer


def cfg(tokens=None, fraction=None, n_sink=1, n_window=2, mode="per_head", **kw):
    return SelectionConfig(Budget(tokens=tokens, fraction=fraction), n_sink, n_window, mode, **kw)


def listed(sel, b, h=0):
    return sel.groups[b, h, : sel.num_pages[b]].tolist()


def test_sinks_window_and_best_groups_per_head():
    scores = torch.tensor([[[0.0, 5, 1, 9, 2, 3, 0, 0], [0, 1, 9, 0, 8, 0, 0, 0]]])  # (1, 2, 8)
    sel = select_groups(scores, torch.tensor([8]), cfg(tokens=5 * 4), group_tokens=4)
    assert sel.num_pages.tolist() == [5]
    assert listed(sel, 0, 0) == [0, 1, 3, 6, 7]  # sink 0, window 6-7, best 3 and 1
    assert listed(sel, 0, 1) == [0, 2, 4, 6, 7]
    assert sel.groups.dtype == torch.int32


def test_shared_mode_lists_one_selection_for_every_head():
    scores = torch.tensor([[[0.0, 5, 1, 9, 2, 3, 0, 0], [0, 1, 9, 0, 8, 0, 0, 0]]])
    sel = select_groups(scores, torch.tensor([8]), cfg(tokens=20, mode="shared"), group_tokens=4)
    assert torch.equal(sel.groups[:, 0], sel.groups[:, 1])
    assert listed(sel, 0) == [0, 2, 3, 6, 7]  # the two heads' peaks (9s) beat either head's runners-up
    sel_max = select_groups(scores, torch.tensor([8]), cfg(tokens=20, mode="shared", shared_reduce="max"), 4)
    assert listed(sel_max, 0) == [0, 2, 3, 6, 7]


def test_budget_covering_the_context_selects_everything():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 2, 10, generator=gen)
    num_groups = torch.tensor([10, 3, 7])
    for mode in ("shared", "per_head"):
        sel = select_groups(scores, num_groups, cfg(tokens=10 * 16, mode=mode), group_tokens=16)
        assert sel.num_pages.tolist() == [10, 3, 7]
        for b, n in enumerate(num_groups.tolist()):
            for h in range(2):
                assert listed(sel, b, h) == list(range(n))


def test_sequences_of_different_lengths_in_one_batch():
    gen = torch.Generator().manual_seed(1)
    num_groups = torch.tensor([40, 5, 1, 17])
    scores = torch.randn(4, 3, 40, generator=gen)
    scores[1, :, 5:] = 100.0  # padding must never be chosen, whatever its score
    sel = select_groups(scores, num_groups, cfg(tokens=8 * 4, n_sink=2, n_window=3), group_tokens=4, max_pages=8)
    assert sel.groups.shape == (4, 3, 8)
    assert sel.num_pages.tolist() == [8, 5, 1, 8]
    mask = selection_mask(sel, 40)  # (B, H_kv, N)
    for b, n in enumerate(num_groups.tolist()):
        forced = [g for g in range(n) if g < 2 or g >= n - 3]
        assert mask[b, :, forced].all()
        assert not mask[b, :, n:].any()
        for h in range(3):
            got = listed(sel, b, h)
            assert got == sorted(got) and len(set(got)) == len(got) and got[-1] == n - 1
            free = [g for g in range(n) if g not in forced]
            best = sorted(free, key=lambda g: -float(scores[b, h, g]))[: len(got) - len(forced)]
            assert set(got) == set(forced) | set(best)


def test_fraction_budget_and_floor_at_sinks_plus_window():
    num_groups = torch.tensor([100, 10])
    sel = select_groups(torch.zeros(2, 1, 100), num_groups, cfg(fraction=0.1, n_sink=1, n_window=4), 8)
    assert sel.num_pages.tolist() == [10, 5]  # 10% of 10 groups is 1, below the 5 always kept


def test_deterministic_ties_go_to_lower_index():
    scores = torch.ones(2, 2, 12)
    a = select_groups(scores, torch.tensor([12, 12]), cfg(tokens=16, n_sink=0, n_window=1), 4)
    b = select_groups(scores.clone(), torch.tensor([12, 12]), cfg(tokens=16, n_sink=0, n_window=1), 4)
    assert torch.equal(a.groups, b.groups) and listed(a, 0) == [0, 1, 2, 11]


def test_nan_and_inf_scores_do_not_break_selection():
    scores = torch.tensor([[[float("nan"), 1.0, float("inf"), float("-inf"), 0.5, 0.0]]])
    sel = select_groups(scores, torch.tensor([6]), cfg(tokens=4, n_sink=0, n_window=1), 1)
    assert listed(sel, 0) == [1, 2, 4, 5]


def test_config_validation():
    with pytest.raises(KvdriveError):
        Budget()
    with pytest.raises(KvdriveError):
        Budget(tokens=4, fraction=0.5)
    with pytest.raises(KvdriveError):
        Budget(fraction=1.5)
    with pytest.raises(KvdriveError):
        SelectionConfig(Budget(tokens=4), n_window=0)
    with pytest.raises(KvdriveError):
        SelectionConfig(Budget(tokens=4), mode="per_token")


def test_recall_counts_true_groups_covered():
    c = cfg(tokens=4, n_sink=0, n_window=1)
    true = select_groups(torch.tensor([[[0.0, 9, 8, 7, 1, 0]]]), torch.tensor([6]), c, 1)
    pred = select_groups(torch.tensor([[[0.0, 9, 1, 7, 8, 0]]]), torch.tensor([6]), c, 1)
    assert listed(true, 0) == [1, 2, 3, 5] and listed(pred, 0) == [1, 3, 4, 5]
    assert recall(pred, true, 6).tolist() == [0.75]
    ignore = forced_mask(torch.tensor([6]), 6, 0, 1)
    assert recall(pred, true, 6, ignore=ignore).tolist() == [pytest.approx(2 / 3)]
    assert recall(true, true, 6).tolist() == [1.0]


class _Layer(nn.Module):
    """Stand-in for a decoder layer: the modules predict_query uses (norm, project_q)."""

    def __init__(self, hidden, h_q, d):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.q = nn.Linear(hidden, h_q * d, bias=False)
        self.h_q, self.d = h_q, d

    def project_q(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h_q, self.d).transpose(1, 2)  # (B, H_q, T, D)
        half = torch.cat((-q[..., self.d // 2 :], q[..., : self.d // 2]), -1)
        return q * cos + half * sin


def test_predicted_query_from_the_true_input_recalls_everything():
    gen = torch.Generator().manual_seed(2)
    h_q, h_kv, d, g, hidden = 4, 2, 16, 4, 24
    torch.manual_seed(2)
    layer = _Layer(hidden, h_q, d)
    x = torch.randn(2, hidden, generator=gen)
    ang = torch.rand(2, 1, 1, d // 2, generator=gen) * 6
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    q_true = layer.project_q(layer.norm(x[:, None]), cos, sin)[:, :, 0]
    q_pred = predict_query(x, layer.norm, layer.project_q, cos, sin)
    torch.testing.assert_close(q_pred, q_true)
    keys = torch.randn(2, 30, h_kv, g, d, generator=gen)
    s = make_summarizer("minmax", h_kv, d, g)
    summ = torch.stack([s.summarize(k) for k in keys])
    c = cfg(tokens=8 * g, n_sink=1, n_window=1)
    sel_true = select_groups(s.score(q_true, summ, None, 0.25), torch.tensor([30, 30]), c, g)
    noisy = q_pred + 3.0 * torch.randn(q_pred.shape, generator=gen)
    sel_noisy = select_groups(s.score(noisy, summ, None, 0.25), torch.tensor([30, 30]), c, g)
    sel_pred = select_groups(s.score(q_pred, summ, None, 0.25), torch.tensor([30, 30]), c, g)
    assert recall(sel_pred, sel_true, 30).tolist() == [1.0, 1.0]
    assert (recall(sel_noisy, sel_true, 30) < 1).any()


@pytest.mark.parametrize("name", ["minmax", "mean", "lowrank_seq"])
@pytest.mark.parametrize("mode", ["shared", "per_head"])
def test_score_select_attend_finds_a_planted_needle(name, mode):
    """End to end on the reference path: one group's keys align with the query; a 25% budget
    must select it, and sparse attention must then match full attention closely."""
    gen = torch.Generator().manual_seed(3)
    h_q, h_kv, d, g, t = 4, 2, 32, 8, 8 * 40 + 3
    k = torch.randn(h_kv, t, d, generator=gen) * 0.3
    v = torch.randn(h_kv, t, d, generator=gen)
    q = torch.randn(1, h_q, d, generator=gen)
    needle = 17
    k[:, needle * g : (needle + 1) * g] = q[0].view(h_kv, 2, d).mean(1)[:, None] * 4.0
    paged = paginate([k], [v], g, shuffle=gen)
    full_groups = t // g
    keys = paged.kv_pool[paged.slot_table[0, :full_groups], 0]  # (N, H_kv, G, D)
    kw = {"rank": 16, "max_seqs": 1} if name == "lowrank_seq" else {}
    s = make_summarizer(name, h_kv, d, g, **kw)
    if name == "lowrank_seq":
        s.fit(0, keys)
    summ = s.summarize(keys, torch.zeros(full_groups, dtype=torch.int64))[None]
    valid = torch.ones(1, full_groups, dtype=torch.bool)
    summ = torch.cat([summ, torch.zeros_like(summ[:, :1])], 1)  # the partly filled group: no summary
    valid = torch.cat([valid, torch.zeros(1, 1, dtype=torch.bool)], 1)
    scores = s.score(q, summ, valid, d**-0.5, rows=torch.zeros(1, dtype=torch.int64))
    sel = select_groups(scores, paged.num_groups, cfg(fraction=0.25, mode=mode), g)
    assert (sel.groups[0, :, : sel.num_pages[0]] == needle).any(dim=-1).all()
    from kvdrive.retrieval import to_slots

    out, _ = sparse_attention_ref(
        q, paged.kv_pool, to_slots(sel.groups, paged.slot_table), sel.num_pages, paged.last_page_len, d**-0.5
    )
    pt, npg = all_pages(paged, h_kv)
    ref, _ = sparse_attention_ref(q, paged.kv_pool, pt, npg, paged.last_page_len, d**-0.5)
    assert float((out - ref).norm() / ref.norm()) < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["shared", "per_head"])
def test_gpu_selection_equals_cpu_selection(mode):
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(16, 8, 8192, generator=gen).round(decimals=1)  # many ties
    num_groups = torch.randint(1, 8193, (16,), generator=gen)
    # NOTE: shared mode with "max" (exact on any device): softmax sums may round differently on a GPU
    c = cfg(tokens=2048, n_sink=1, n_window=5, mode=mode, shared_reduce="max")
    a = select_groups(scores, num_groups, c, 16, max_pages=128)
    b = select_groups(scores.cuda(), num_groups.cuda(), c, 16, max_pages=128)
    assert torch.equal(a.num_pages, b.num_pages.cpu())
    for i in range(16):
        n = int(a.num_pages[i])
        assert torch.equal(a.groups[i, :, :n], b.groups[i, :, :n].cpu())


def test_topk_key_orders_like_a_stable_descending_sort():
    from kvdrive.retrieval.select import _topk_lowest_index_first

    gen = torch.Generator().manual_seed(5)
    s = torch.randn(6, 300, generator=gen).round(decimals=1)  # many ties, both signs
    s[:, ::7] = -0.0
    s[:, 3::11] = 0.0
    s[0, :4] = torch.tensor([float("inf"), float("-inf"), 1e-38, -1e-38])
    expect = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :50]
    assert torch.equal(_topk_lowest_index_first(s, 50), expect)


def test_selection_kernel_matches_the_torch_path():
    """The one-program-per-sequence selection (Triton, interpreted on CPU) lists the same groups
    as the torch path, for ragged lengths, short sequences, padding and -inf scores, and its
    eviction key is the heads' combined softmax."""
    pytest.importorskip("triton")
    run_interpreted(__file__, "check_selection_kernel")


def check_selection_kernel() -> None:

    def both(scores, num_groups, c, max_pages):  # one program per sequence; chunks of 16 groups (split kernels)
        one = select_groups_keyed(scores, num_groups, c, 4, max_pages, impl="triton")
        return one, _select_kernel(scores, num_groups, c, 4, max_pages, chunk=16)

    gen = torch.Generator().manual_seed(3)
    for n, budget, lens in ((40, 64, [40, 7, 23, 1]), (100, 160, [100, 99, 64, 12]), (33, 400, [33, 20, 5, 33])):
        scores = torch.randn(4, 3, n, generator=gen)
        num_groups = torch.tensor(lens)
        scores = scores.masked_fill(torch.arange(n)[None, None, :] >= num_groups[:, None, None], float("-inf"))
        scores[1, 2, 3] = float("-inf")
        c = cfg(tokens=budget, n_sink=2, n_window=3, mode="shared")
        max_pages = min(n, -(-budget // 4))
        want = select_groups(scores, num_groups, c, 4, max_pages=max_pages, impl="torch")
        for got, key in both(scores, num_groups, c, max_pages):
            assert torch.equal(got.num_pages, want.num_pages) and torch.equal(got.groups, want.groups), (n, budget)
            torch.testing.assert_close(key, combine_heads(scores, "softmax_sum")[:, 0])
    assert want.num_pages.tolist() != [max_pages] * 4  # short sequences took fewer pages
    # ties: groups whose scores are equal on every head carry the same mass; the lower index wins,
    # also across the split kernels' chunks
    scores = torch.randint(0, 2, (3, 2, 64), generator=gen).float()
    scores[:, 1] = scores[:, 0]
    num_groups = torch.tensor([64, 50, 9])
    c = cfg(tokens=80, n_sink=1, n_window=2, mode="shared")
    want = select_groups(scores, num_groups, c, 4, max_pages=20, impl="torch")
    for got, _ in both(scores, num_groups, c, 20):
        assert torch.equal(got.num_pages, want.num_pages) and torch.equal(got.groups, want.groups)
    assert (scores[0, 0, 1:62] == 1).sum() > 17  # sequence 0: 17 of its candidates taken, of more tied 1s


@pytest.mark.gpu
def test_selection_kernel_matches_the_torch_path_on_gpu():
    """Llama-3.1-8B decode shape at 32K and 128K (8 KV heads, 2048 / 8192 groups, budget 2048)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n in (2048, 8192):
        scores = torch.randn(16, 8, n, generator=gen, device="cuda")
        num_groups = torch.randint(n // 2, n + 1, (16,), generator=gen, device="cuda")
        scores = scores.masked_fill(
            torch.arange(n, device="cuda")[None, None, :] >= num_groups[:, None, None], float("-inf")
        )
        c = cfg(tokens=2048, n_sink=4, n_window=16, mode="shared")
        want = select_groups(scores, num_groups, c, 16, max_pages=128, impl="torch")
        for chunk in (None, 0, 1024):  # the default; one program per sequence; the split kernels
            got, key = _select_kernel(scores, num_groups, c, 16, 128, chunk=chunk)
            assert torch.equal(got.num_pages, want.num_pages) and torch.equal(got.groups, want.groups), chunk
            torch.testing.assert_close(key, combine_heads(scores, "softmax_sum")[:, 0])
