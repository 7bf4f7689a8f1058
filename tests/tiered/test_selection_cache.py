"""The GPU selection cache and the tier kernels: ``SelectionCache.ensure`` (its torch body
and its one Triton kernel, which must agree call after call), the row copy that fills it
(``copy_rows``) and the kernels that write KV into the tiers (``tier_ops``: write_tokens,
append_token) against their torch twins."""

import pytest
import torch
from conftest import KERNEL_DEVICES, check_kernel, run_interpreted

from kvdrive.quant.formats import dequantize, quantize
from kvdrive.storage.gather import copy_rows, words
from kvdrive.tiered import tier_ops
from kvdrive.tiered.host_kv import StoredRows
from kvdrive.tiered.selection_cache import SelectionCache

CPU, F32 = torch.device("cpu"), torch.float32


def test_selection_cache_invariants_under_random_selections():
    gen = torch.Generator().manual_seed(0)
    n, cap, s = 40, 12, 3
    c = SelectionCache(cap, s, n, (2, 1, 2, 4), CPU, F32, "lookahead")
    source = torch.randn(s * n, 2, 1, 2, 4, generator=gen)
    rows = torch.tensor([2, 0])
    for step in range(30):
        groups = torch.stack([torch.randperm(n, generator=gen)[:8] for _ in rows])  # (B, 8) distinct
        listed = torch.rand(2, 8, generator=gen) < 0.8
        pages = c.ensure(
            rows,
            groups,
            listed,
            torch.randn(2, n, generator=gen),
            words(source),
            rows[:, None] * n + groups,
            torch.tensor(float(step)),
        )
        # every listed group is resident and its page holds the source group
        for b in range(2):
            for j in range(8):
                if listed[b, j]:
                    torch.testing.assert_close(c.pool[pages[b, j]], source[rows[b] * n + groups[b, j]])
        # table and owner agree both ways
        for r in rows.tolist():
            own = c.owner[r, :cap]
            for slot, g in enumerate(own.tolist()):
                if g >= 0:
                    assert c.table[r, g] == slot
            assert int((c.table[r, :n] >= 0).sum()) == int((own >= 0).sum())


def test_triton_kernels_match_reference(interpret):
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(20, 2, 2, 4, 8, generator=gen).to(torch.bfloat16)
    want, got = torch.zeros(9, 2, 2, 4, 8, dtype=torch.bfloat16), torch.zeros(9, 2, 2, 4, 8, dtype=torch.bfloat16)
    sidx, didx = torch.tensor([3, 19, 0, 7]), torch.tensor([8, -1, 0, 4])
    w = words
    copy_rows(w(src), sidx, w(want), didx, w(src).shape[1], impl="torch")
    copy_rows(w(src), sidx, w(got), didx, w(src).shape[1], impl="triton")
    assert torch.equal(got, want) and not torch.equal(got[1], src[19])
    for programs in (1, 3):  # looping programs: fewer than the tiles, each takes several
        got = torch.zeros_like(want)
        copy_rows(w(src), sidx, w(got), didx, w(src).shape[1], impl="triton", programs=programs)
        assert torch.equal(got, want)
    # a packed list: the first live[0] rows are copied; what follows is never read (out of range here)
    sidx, didx, live = (
        torch.tensor([3, 0, 7, 10**6]),
        torch.tensor([8, 0, 4, 10**6]),
        torch.tensor([3], dtype=torch.int32),
    )
    for impl, programs in (("triton", 0), ("triton", 2), ("torch", 0)):
        got = torch.zeros_like(want)
        copy_rows(w(src), sidx, w(got), didx, w(src).shape[1], impl=impl, programs=programs, live=live)
        assert torch.equal(got, want), (impl, programs)
    k, v = torch.randn(2, 2, 3, 8, generator=gen), torch.randn(2, 2, 3, 8, generator=gen)
    rows, offs = torch.tensor([[1, 1, 2], [5, 6, 6]]), torch.tensor([[2, 3, 0], [3, 0, 1]])
    want, got = torch.zeros(9, 2, 2, 4, 8), torch.zeros(9, 2, 2, 4, 8)
    tier_ops.write_tokens(want, rows, offs, k, v, impl="torch")
    tier_ops.write_tokens(got, rows, offs, k, v, impl="triton")
    assert torch.equal(got, want) and want.abs().sum() > 0
    # a decode token into its host row and the GPU cache's copy of its open group: one kernel
    caches = [SelectionCache(3, 4, 6, (2, 2, 4, 8), CPU, F32, "lookahead") for _ in range(2)]
    for c in caches:
        c.table[1, 2], c.table[3, 5] = 2, 0  # slot 1's group 2 and slot 3's group 5 are cached
    kv = torch.randn(3, 1, 2 * 2 * 8, generator=gen)  # strided k/v (B, H, 1, D), views of one projection
    k, v = (x.view(3, 1, 2, 8).transpose(1, 2) for x in kv.split(16, dim=-1))
    slots, groups, at = torch.tensor([1, 3, 0]), torch.tensor([2, 5, 4]), torch.tensor([3, 0, 1])
    hosts = [torch.zeros(9, 2, 2, 4, 8) for _ in range(2)]
    for host, c, impl in zip(hosts, caches, ("torch", "triton")):
        tier_ops.append_token(host, torch.tensor([7, 2, 5]), at, k, v, c, slots, groups, impl=impl)
    assert torch.equal(hosts[0], hosts[1]) and torch.equal(hosts[0][2, 1, :, 0], v[1, :, 0])
    assert torch.equal(caches[0].pool, caches[1].pool)
    assert torch.equal(caches[1].pool[1 * 3 + 2, 0, :, 3], k[0, :, 0])  # cached: written
    assert caches[1].pool[: caches[1].trash].count_nonzero() == 2 * 2 * 2 * 8  # two cached groups, k and v
    # strided k/v, as views of a fused projection (B, T, H*D) -> (B, H, T, D): no copy first
    kv = torch.randn(2, 3, 2 * 2 * 8, generator=gen)
    k, v = (x.view(2, 3, 2, 8).transpose(1, 2) for x in kv.split(16, dim=-1))
    assert not k.is_contiguous()
    want, got = torch.zeros(9, 2, 2, 4, 8), torch.zeros(9, 2, 2, 4, 8)
    tier_ops.write_tokens(want, rows, offs, k, v, impl="torch")
    tier_ops.write_tokens(got, rows, offs, k, v, impl="triton")
    assert torch.equal(got, want) and want.abs().sum() > 0


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_defer_split_serves_what_is_held_and_flags_the_rest(device):
    """``tier_ops.defer_split`` (one kernel per layer of a deferred-miss step) against its torch
    twin and against the rule: a listed group is served when the GPU cache or the arena holds
    it, else left out (flag 2); served groups come first, in their order, with their arena rows.
    On CPU under Triton's interpreter in a fresh process (its ``tl.cumsum`` is bound at import)."""
    check_kernel(check_defer_split, device)


def check_defer_split(device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    s, n, p = 5, 30, 12
    host_map = torch.where(torch.rand(s, n, generator=gen) < 0.6, torch.randint(0, 99, (s, n), generator=gen), -1)
    table = torch.where(torch.rand(s, n + 1, generator=gen) < 0.3, 1, -1).to(torch.int32)
    picks = torch.stack([torch.randperm(n, generator=gen)[:p] for _ in range(3)]).to(torch.int32)
    groups = torch.stack([picks, picks], 1)[:, 0]  # a strided view, as a selection's first head
    assert not groups.is_contiguous()
    num_pages = torch.tensor([12, 7, 0], dtype=torch.int32)
    slots = torch.tensor([4, 0, 2])
    host_map, table, groups, num_pages, slots = (t.to(device) for t in (host_map, table, groups, num_pages, slots))
    out = {
        impl: [t.cpu() for t in tier_ops.defer_split(groups, num_pages, slots, host_map, table, impl=impl)]
        for impl in ("torch", "triton")
    }
    groups, num_pages, slots, host_map, table = (t.cpu() for t in (groups, num_pages, slots, host_map, table))
    for b in range(3):
        g = groups[b, : num_pages[b]].long()
        held = (table[slots[b], g] >= 0) | (host_map[slots[b], g] >= 0)
        for kept, kept_pages, src, flags in out.values():
            k = int(kept_pages[b])
            assert k == int(held.sum())
            assert kept[b, :k].tolist() == g[held].tolist()
            assert src[b, :k].tolist() == host_map[slots[b], g[held]].tolist()
            want = torch.zeros(p, dtype=torch.uint8)
            want[: len(g)] = 1 + 2 * (~held).to(torch.uint8)
            assert flags[b].tolist() == want.tolist()
    assert int(out["triton"][1].sum()) > 0 and (out["triton"][3] == 3).any()  # some served, some left out


def _ensure_sequence(impl: str, eviction: str, cap: int, seed: int = 0, compact: bool = False, stored: bool = False):
    """A fixed random series of ensure calls (some prefetches, some groups only on disk) on a
    fresh cache; returns the cache and every call's pages. Every other call lists a prefix of
    its groups; ``compact`` passes those as the selection kernel gives them: int32 groups of a
    strided view, counts for the listed mask, the int n for host rows s*n + g. ``stored``: a
    compressed source (fp8 rows, and each slot's open group from its exact row)."""
    gen = torch.Generator().manual_seed(seed)
    n, s, p = 50, 4, 9
    c = SelectionCache(cap, s, n, (2, 1, 2, 4), CPU, F32, eviction, impl=impl)
    source = torch.randn(s * n, 2, 1, 2, 4, generator=gen)
    if stored:
        open_groups = torch.randint(0, n, (s,), generator=gen)
        raw = torch.randn(s, 16, generator=gen)
        source = StoredRows(quantize(source, "fp8"), raw, s * n, open_groups, "fp8", (1, 2, 4))
    out = []
    for step in range(24):
        rows = torch.randperm(s, generator=gen)[:3]
        groups = torch.stack([torch.randperm(n, generator=gen)[:p] for _ in rows])  # (B, P) distinct
        listed = torch.rand(3, p, generator=gen) < 0.85
        prefetch = step % 3 == 2
        src = rows[:, None] * n + groups
        if prefetch:  # a prefetch skips groups only on disk (source row -1)
            src = torch.where(torch.rand(3, p, generator=gen) < 0.2, -1, src)
        scores = torch.randn(3, n, generator=gen).round(decimals=1)  # ties happen
        if step % 2 == 1 and not prefetch:
            counts = torch.randint(0, p + 1, (3,), generator=gen, dtype=torch.int32)
            listed = torch.arange(p)[None, :] < counts[:, None]
            if compact:
                groups = torch.stack((groups, groups.flip(1)), dim=1).to(torch.int32)[:, 0]  # (B, P) strided
                listed, src = counts, n
        fetch = source if stored else words(source)
        out.append(c.ensure(rows, groups, listed, scores, fetch, src, torch.tensor(float(step)), prefetch))
        if step == 12:
            c.clear(rows[:1])
    return c, out


@pytest.mark.parametrize("eviction", ["lookahead", "lru"])
def test_ensure_kernel_matches_the_torch_body(eviction):
    """The one-kernel ensure (Triton, interpreted on CPU) gives the torch body's pages, victims,
    table, owners, stamps, fresh flags, counters and pool, call after call."""
    pytest.importorskip("triton")
    run_interpreted(__file__, "check_ensure_kernel", eviction)


def test_ensure_takes_a_selection_as_the_kernel_gives_it():
    """Counts for the listed mask, int32 strided groups and the int n for host rows give the
    explicit inputs' results."""
    want, want_pages = _ensure_sequence("torch", "lookahead", 9)
    got, got_pages = _ensure_sequence("torch", "lookahead", 9, compact=True)
    for a, b in zip(want_pages, got_pages):
        assert torch.equal(a, b)
    assert torch.equal(want.table, got.table) and torch.equal(want.pool, got.pool)


def test_a_compressed_source_serves_open_groups_from_their_exact_rows():
    """A ``StoredRows`` source: stored groups are widened into the cache's pool, and a slot's open
    group is read from its raw row whatever source row the caller gives."""
    c = SelectionCache(4, 2, 10, (2, 1, 2, 4), CPU, F32)
    groups = torch.randn(20, 2, 1, 2, 4)
    raw = torch.randn(2, 16)
    src = StoredRows(quantize(groups, "fp8"), raw, 20, torch.tensor([3, 7]), "fp8", (1, 2, 4))
    rows, want = torch.tensor([0, 1]), torch.tensor([[3, 5], [7, 2]])
    pages = c.ensure(rows, want, torch.ones(2, 2, dtype=torch.bool), None, src, 10, torch.tensor(0.0)).long()
    assert torch.equal(c.pool[pages[0, 0]].reshape(-1), raw[0]) and torch.equal(c.pool[pages[1, 0]].reshape(-1), raw[1])
    for page, row in ((pages[0, 1], 5), (pages[1, 1], 12)):
        assert torch.equal(c.pool[page], dequantize(src.rows[row : row + 1], "fp8", (1, 2, 4), F32)[0])
    assert not torch.equal(c.pool[pages[0, 1]], groups[5])  # widened from fp8, not the exact group


def check_ensure_kernel(eviction: str) -> None:
    for cap, compact, stored in ((9, False, False), (23, False, False), (9, True, False), (9, True, True)):
        want, want_pages = _ensure_sequence("torch", eviction, cap, stored=stored)
        got, got_pages = _ensure_sequence("triton", eviction, cap, compact=compact, stored=stored)
        for a, b in zip(want_pages, got_pages):
            assert torch.equal(a, b)
        assert torch.equal(want.table[:, :-1], got.table[:, :-1])
        for name in ("owner", "stamp", "fresh"):
            assert torch.equal(getattr(want, name)[:, :cap], getattr(got, name)[:, :cap]), name
        assert torch.equal(want.counters, got.counters) and want.counters[2] > 0 and want.counters[3] > 0
        assert torch.equal(want.pool[:-1], got.pool[:-1])


@pytest.mark.gpu
@pytest.mark.parametrize("eviction", ["lookahead", "lru"])
def test_ensure_kernel_matches_the_torch_body_on_gpu(eviction):
    """Real barriers and atomics: the kernel on CUDA against the torch body on CUDA, with a
    capacity above one warp's worth of slots and ragged selections."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    n, s, p, cap = 2049, 8, 128, 300
    caches = [
        SelectionCache(cap, s, n - 1, (2, 8, 16, 128), dev, torch.bfloat16, eviction, impl=i)
        for i in ("torch", "triton")
    ]
    source = torch.randn(s * n, 2, 8, 16, 128, dtype=torch.bfloat16).pin_memory()
    for step in range(24):
        rows = torch.randperm(s, device=dev, generator=gen)[:6]
        groups = torch.stack([torch.randperm(n - 1, device=dev, generator=gen)[:p] for _ in range(6)])
        listed = torch.arange(p, device=dev)[None, :] < torch.randint(p // 2, p + 1, (6, 1), device=dev, generator=gen)
        scores = torch.rand(6, n - 1, device=dev, generator=gen)
        src = rows[:, None] * n + groups
        pages = [
            c.ensure(
                rows, groups, listed, scores, words(source), src, torch.tensor(float(step), device=dev), step % 4 == 3
            )
            for c in caches
        ]
        assert torch.equal(pages[0], pages[1]), step
    want, got = caches
    assert torch.equal(want.table[:, :-1], got.table[:, :-1]) and torch.equal(want.counters, got.counters)
    for name in ("owner", "stamp", "fresh"):
        assert torch.equal(getattr(want, name)[:, :cap], getattr(got, name)[:, :cap]), name
    assert torch.equal(want.pool[:-1], got.pool[:-1])
