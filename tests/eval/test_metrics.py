"""Sparse-vs-full metrics on distributions with known answers."""

import math

import pytest
import torch

from kvdrive.eval.metrics import (
    Comparison,
    bits_per_byte,
    compare_logits,
    kl_per_token,
    nll_per_token,
    pool,
    top1_agree,
)


def logits_of(*probs):
    """(N, V) logits whose softmax rows are ``probs``."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


def test_identical_logits_are_perfect():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 50)
    t = torch.randint(0, 50, (2, 7))
    c = compare_logits(x, x.clone(), t)
    assert c.kl == pytest.approx(0.0, abs=1e-6) and c.kl_max == pytest.approx(0.0, abs=1e-6)
    assert c.top1_agreement == 1.0 and c.nll_ref == c.nll_test and c.ppl_delta == 0.0
    assert c.tokens == 14


def test_kl_of_known_distributions():
    p, q = (0.5, 0.5), (0.9, 0.1)
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    kl = kl_per_token(logits_of(p), logits_of(q))
    assert kl.item() == pytest.approx(expected, rel=1e-5)
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert kl_per_token(logits_of(q), logits_of(p)).item() == pytest.approx(reverse, rel=1e-5)  # not symmetric


def test_kl_ignores_logit_shifts_and_is_nonnegative():
    torch.manual_seed(1)
    a, b = torch.randn(64, 100), torch.randn(64, 100)
    assert torch.allclose(kl_per_token(a + 3.0, b - 2.0), kl_per_token(a, b), atol=1e-5)
    assert (kl_per_token(a, b) >= 0).all()


def test_zero_probability_in_the_reference_is_not_nan():
    ref = torch.tensor([[0.0, -math.inf, 1.0]])
    test = torch.tensor([[0.0, -math.inf, 0.0]])
    kl = kl_per_token(ref, test)
    assert torch.isfinite(kl).all() and kl.item() > 0
    assert kl_per_token(test, torch.tensor([[0.0, 0.0, -math.inf]])).item() == math.inf


def test_low_precision_inputs_are_computed_in_float32():
    torch.manual_seed(2)
    x = torch.randn(4, 1000)
    got = compare_logits(x.bfloat16(), x.bfloat16(), torch.zeros(4, dtype=torch.long))
    assert got.kl == pytest.approx(0.0, abs=1e-6)


def test_top1_agreement_counts_argmax_matches():
    ref = logits_of((0.7, 0.2, 0.1), (0.1, 0.8, 0.1), (0.2, 0.2, 0.6), (0.5, 0.4, 0.1))
    test = logits_of((0.6, 0.3, 0.1), (0.1, 0.7, 0.2), (0.3, 0.2, 0.5), (0.4, 0.5, 0.1))
    assert top1_agree(ref, test).tolist() == [True, True, True, False]
    assert compare_logits(ref, test, torch.zeros(4, dtype=torch.long)).top1_agreement == 0.75


def test_uniform_model_has_perplexity_v_and_8_bits_per_byte():
    v, n = 256, 10
    uniform = torch.zeros(n, v)
    t = torch.randint(0, v, (n,))
    assert torch.allclose(nll_per_token(uniform, t), torch.full((n,), math.log(v)))
    c = compare_logits(uniform, uniform, t, n_bytes=n)  # one byte per token
    assert c.ppl_ref == pytest.approx(v) and c.bpb_ref == pytest.approx(8.0)


def test_perplexity_delta_of_a_worse_model():
    t = torch.tensor([0, 0])
    ref = logits_of((0.5, 0.5), (0.5, 0.5))  # p(target) = 1/2: ppl 2
    test = logits_of((0.25, 0.75), (0.25, 0.75))  # p(target) = 1/4: ppl 4
    c = compare_logits(ref, test, t, n_bytes=4)
    assert (c.ppl_ref, c.ppl_test, c.ppl_delta) == pytest.approx((2.0, 4.0, 2.0))
    assert c.bpb_test == pytest.approx(2 * 2 / 4)  # 2 tokens x 2 bits over 4 bytes
    d = c.to_dict()
    assert d["ppl_delta"] == pytest.approx(2.0) and d["tokens"] == 2


def test_pooling_equals_comparing_everything_at_once():
    torch.manual_seed(3)
    ref, test = torch.randn(10, 30), torch.randn(10, 30)
    t = torch.randint(0, 30, (10,))
    whole = compare_logits(ref, test, t, n_bytes=40)
    parts = [compare_logits(ref[:3], test[:3], t[:3], n_bytes=12), compare_logits(ref[3:], test[3:], t[3:], n_bytes=28)]
    pooled = pool(parts)
    for field in ("kl", "kl_max", "top1_agreement", "nll_ref", "nll_test", "bpb_test"):
        assert getattr(pooled, field) == pytest.approx(getattr(whole, field), rel=1e-5)
    assert pooled.tokens == 10 and pooled.n_bytes == 40
    assert pool([parts[0], Comparison(1, 0.0, 0.0, 1.0, 1.0, 1.0)]).n_bytes is None


def test_shape_errors():
    with pytest.raises(ValueError):
        kl_per_token(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError):
        compare_logits(torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)
