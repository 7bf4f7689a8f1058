import pytest
import torch
from conftest import run_interpreted

from kvdrive.device import triton_available
from kvdrive.errors import KvdriveError
from kvdrive.quant import dequant_rows_reference, dequantize, quantize, stored_bytes
from kvdrive.quant.formats import sections

# Relative Frobenius error of a round trip of Gaussian KV with channel outliers in the keys.
BOUNDS = {"bf16": 0.0, "fp8": 0.04, "int8": 0.012, "int4": 0.15}


def kv_groups(n=3, h=2, g=16, d=64, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, h, g, d, generator=gen)
    x[:, 0] *= 1 + 20 * torch.rand(h, 1, d, generator=gen)  # outlier channels, as RoPE'd keys have
    return x.to(dtype)


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "int8", "int4"])
def test_round_trip_error_is_bounded(fmt):
    x = kv_groups()
    rows = quantize(x, fmt)
    assert rows.dtype == torch.uint8 and rows.shape == (3, stored_bytes(fmt, 2, 16, 64, 2))
    y = dequantize(rows, fmt, (2, 16, 64), torch.bfloat16)
    assert y.shape == x.shape and y.dtype == x.dtype
    for kv in (0, 1):  # keys and values each, not only together
        err = (y[:, kv].float() - x[:, kv].float()).norm() / x[:, kv].float().norm()
        assert err <= BOUNDS[fmt], (fmt, kv, float(err))


def test_keys_are_scaled_per_channel_values_per_token():
    # one huge key channel and one huge value token must not flatten the others to zero
    x = kv_groups(n=1, g=8, d=16)
    x[0, 0, :, :, 3] *= 1000
    x[0, 1, :, 5, :] *= 1000
    for fmt in ("fp8", "int8", "int4"):
        y = dequantize(quantize(x, fmt), fmt, (2, 8, 16), torch.bfloat16).float()
        rest_k = [c for c in range(16) if c != 3]
        rest_v = [t for t in range(8) if t != 5]
        for got, want in ((y[0, 0][..., rest_k], x[0, 0][..., rest_k]), (y[0, 1][:, rest_v], x[0, 1][:, rest_v])):
            err = (got - want.float()).norm() / want.float().norm()
            assert err <= BOUNDS[fmt], (fmt, float(err))


def test_zero_and_constant_spans_decode_exactly_enough():
    x = torch.zeros(1, 2, 2, 4, 8, dtype=torch.bfloat16)
    x[0, 1, 1] = 2.5  # constant values of one head
    for fmt in ("fp8", "int8", "int4"):
        y = dequantize(quantize(x, fmt), fmt, (2, 4, 8), torch.bfloat16)
        assert torch.isfinite(y.float()).all()
        torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-3)


def test_stored_bytes_shrink_and_sections_do_not_overlap():
    h, g, d = 8, 256, 128
    bf16 = stored_bytes("bf16", h, g, d, 2)
    assert stored_bytes("fp8", h, g, d, 2) / bf16 < 0.52
    assert stored_bytes("int4", h, g, d, 2) / bf16 < 0.27
    assert stored_bytes("int8", h, g, d, 2) == stored_bytes("fp8", h, g, d, 2)
    for fmt in ("fp8", "int8", "int4"):
        sec = sorted(sections(fmt, h, g, d).values())
        assert all(a.offset + a.nbytes <= b.offset and b.offset % 16 == 0 for a, b in zip(sec, sec[1:]))
        assert stored_bytes(fmt, h, g, d, 2) % 16 == 0


def test_bad_format_and_odd_int4_dim_are_refused():
    with pytest.raises(KvdriveError, match="bf16, fp8, int8, int4"):
        stored_bytes("fp4", 1, 1, 8, 2)
    with pytest.raises(KvdriveError, match="even head_dim"):
        sections("int4", 1, 4, 7)


def test_reference_skips_negative_destinations():
    x = kv_groups(n=2, g=4, d=8)
    src = quantize(x, "int4")
    dst = torch.zeros(3, x[0].numel(), dtype=torch.bfloat16)
    dequant_rows_reference(src, torch.tensor([1, 0]), dst, torch.tensor([2, -1]), "int4", (2, 4, 8))
    assert torch.count_nonzero(dst[:2]) == 0
    torch.testing.assert_close(dst[2], dequantize(src[1:2], "int4", (2, 4, 8), torch.bfloat16).reshape(-1))


def test_reference_reads_raw_rows_past_the_threshold():
    x = kv_groups(n=2, g=4, d=8)
    src = quantize(x, "fp8")
    raw = torch.randn(2, x[0].numel()).to(torch.bfloat16)
    dst = torch.zeros(3, x[0].numel(), dtype=torch.bfloat16)
    dequant_rows_reference(src, torch.tensor([3, 0, 2]), dst, torch.tensor([0, 1, -1]), "fp8", (2, 4, 8), raw, 2)
    assert torch.equal(dst[0], raw[1])
    torch.testing.assert_close(dst[1], dequantize(src[:1], "fp8", (2, 4, 8), torch.bfloat16).reshape(-1))
    assert torch.count_nonzero(dst[2]) == 0


def check_dequant_kernel() -> None:
    """The Triton dequantizer equals its torch twin (run under the interpreter by the test below)."""
    from kvdrive.quant import dequant_rows

    torch.manual_seed(0)
    # G not a power of two; G over one tile; H over one tile (4 heads of 16 x 128)
    for h, g, d in ((2, 16, 64), (3, 5, 6), (1, 40, 16), (6, 16, 128)):
        x = (torch.randn(4, 2, h, g, d) * 3).to(torch.bfloat16)
        for fmt in ("fp8", "int8", "int4"):
            src = torch.cat([quantize(x, fmt), torch.zeros(4, 32, dtype=torch.uint8)], 1)  # padded rows
            si, di = torch.tensor([3, 0, 2, 1]), torch.tensor([1, -1, 0, 4])  # -1: the row is skipped
            a = torch.zeros(6, 2 * h * g * d + 8, dtype=torch.bfloat16)
            b = a.clone()
            dequant_rows(src, si, a, di, fmt, (h, g, d), impl="triton")
            dequant_rows_reference(src, si, b, di, fmt, (h, g, d))
            torch.testing.assert_close(a, b)  # the interpreter rounds to bf16 its own way: one ulp
            assert a.abs().sum() > 0 and torch.count_nonzero(a[[2, 3, 5]]) == 0
            looped = torch.zeros_like(a)  # 3 programs looping over every (row, K|V, heads x tokens) tile
            dequant_rows(src, si, looped, di, fmt, (h, g, d), impl="triton", programs=3)
            assert torch.equal(looped, a)
            # a packed list: only the first live[0] rows are read, whatever follows them
            packed_si, packed_di = torch.tensor([3, 2, 99, -7]), torch.tensor([1, 0, 12345, 3])
            for programs in (0, 3):
                packed = torch.zeros_like(a)
                dequant_rows(
                    src,
                    packed_si,
                    packed,
                    packed_di,
                    fmt,
                    (h, g, d),
                    impl="triton",
                    programs=programs,
                    live=torch.tensor([2], dtype=torch.int32),
                )
                assert torch.equal(packed[[0, 1]], a[[0, 1]]) and torch.count_nonzero(packed[2:]) == 0
            # a second, raw source for indices >= 4 (typed rows, copied as they are), in the same launch
            raw = (torch.randn(3, 2 * h * g * d + 4) * 3).to(torch.bfloat16)
            si, di = torch.tensor([5, 0, 4, 6, 2]), torch.tensor([1, 3, -1, 0, 5])
            a, b = torch.zeros_like(a), torch.zeros_like(a)
            dequant_rows(src, si, a, di, fmt, (h, g, d), impl="triton", raw=raw, raw_from=4)
            dequant_rows_reference(src, si, b, di, fmt, (h, g, d), raw=raw, raw_from=4)
            torch.testing.assert_close(a, b)
            looped = torch.zeros_like(a)
            dequant_rows(src, si, looped, di, fmt, (h, g, d), impl="triton", raw=raw, raw_from=4, programs=2)
            assert torch.equal(looped, a)
            assert torch.equal(a[0, : raw.shape[1] - 4], raw[2, :-4]) and torch.equal(a[1, :-8], raw[1, :-4])
            assert torch.count_nonzero(a[[2, 4]]) == 0


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_dequant_matches_reference_under_interpreter():
    run_interpreted(__file__, "check_dequant_kernel")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
def test_dequant_from_pinned_host_matches_reference_on_gpu(fmt):
    from kvdrive.quant import dequant_rows

    x = kv_groups(n=8, h=8, g=16, d=128).cuda()
    rows = quantize(x, fmt)
    host = torch.empty(rows.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(rows.cpu())
    si = torch.tensor([7, 1, 3, 0], device="cuda")
    di = torch.tensor([0, 2, -1, 1], device="cuda")
    a = torch.zeros(3, x[0].numel(), dtype=torch.bfloat16, device="cuda")
    b = a.clone()
    dequant_rows(host, si, a, di, fmt, (8, 16, 128), impl="triton")  # reads pinned rows through UVA
    dequant_rows_reference(rows, si, b, di, fmt, (8, 16, 128))
    torch.cuda.synchronize()
    torch.testing.assert_close(a, b)


def test_fp8_keys_keep_a_channel_bias_out_of_the_error():
    # keys centred per channel: a large bias costs nothing, the error is relative to the spread
    x = kv_groups(n=2, g=16, d=32)
    bias = torch.linspace(-200, 200, 32)
    x[:, 0] = (x[:, 0].float() + bias).to(x.dtype)
    y = dequantize(quantize(x, "fp8"), "fp8", (2, 16, 32), torch.bfloat16)
    spread = x[:, 0].float() - bias
    err = (y[:, 0].float() - x[:, 0].float()).norm() / spread.norm()
    assert err <= BOUNDS["fp8"], float(err)


def test_stored_names_carry_the_format_and_its_revision():
    from kvdrive.storage.layout import GroupLayout

    names = {f: GroupLayout(2, 2, 8, torch.bfloat16, 4, f).name for f in ("bf16", "fp8", "int8", "int4")}
    assert names["bf16"] == "kv2-h2-g4-d8-bfloat16"  # unchanged: pools of the model dtype stay valid
    assert names["fp8"].endswith("-fp8r2") and names["int4"].endswith("-int4r1")
    assert names["int8"].endswith("-int8r1")  # the same bytes as fp8's, never read as fp8


def test_int8_keys_beat_fp8_keys_on_the_same_bytes():
    # 256 even levels across a channel's range against e4m3's 3 mantissa bits of each value: the
    # large entries, which dominate q.k, keep more precision
    x = kv_groups(n=4, g=16, d=64, seed=3)
    errs = {}
    for fmt in ("fp8", "int8"):
        y = dequantize(quantize(x, fmt), fmt, (2, 16, 64), torch.bfloat16)
        errs[fmt] = [float((y[:, i].float() - x[:, i].float()).norm() / x[:, i].float().norm()) for i in (0, 1)]
    assert errs["int8"][0] < errs["fp8"][0] / 2 and errs["int8"][1] < errs["fp8"][1] / 2, errs


def test_int8_values_keep_their_sign_and_extremes():
    x = torch.zeros(1, 2, 1, 4, 8, dtype=torch.bfloat16)
    x[0, 1, 0, 0] = torch.tensor([-3.0, 3.0, -1.5, 1.5, 0.0, -3.0, 0.75, 3.0])
    x[0, 0, 0] = torch.arange(32, dtype=torch.bfloat16).view(4, 8) - 16
    y = dequantize(quantize(x, "int8"), "int8", (1, 4, 8), torch.bfloat16)
    torch.testing.assert_close(y, x, rtol=0, atol=0.02)
