"""Every Llama-family variant (bias, q/k norm, llama3 RoPE, sliding window) against
transformers, with small random weights shared by both implementations."""

import pytest
import torch
from conftest import KERNEL_DEVICES, check_kernel

from kvdrive.cache.contiguous import ContiguousKVCache
from kvdrive.models.decoder import DecoderLM
from kvdrive.models.registry import from_hf_config

SMALL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)

VARIANTS = {
    "llama3-rope": (
        "llama",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            }
        ),
    ),
    "qwen2-bias": ("qwen2", dict()),
    "qwen3-qknorm": ("qwen3", dict(head_dim=32)),
    "mistral-window": ("mistral", dict(sliding_window=48)),
    "gemma3": (
        "gemma3_text",
        dict(
            head_dim=32,
            sliding_window=32,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    ),
}


def _pair(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = VARIANTS[name]
    hf_cfg = AutoConfig.for_model(model_type, **SMALL, **extra)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # norms are initialised to constants: randomise them too
        for _, p in hf.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    ours = DecoderLM(from_hf_config(hf_cfg))
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and all(k == "lm_head.weight" for k in unexpected)
    return hf, ours.eval()


@pytest.mark.parametrize("fused", [False, True], ids=["qkv", "fused-qkv"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_matches_transformers(name, fused):
    """Also with q/k/v fused into one GEMM (biases and q/k norms included) and gate/up into
    another, as loaders build them."""
    hf, ours = _pair(name)
    if fused:
        keys = set(ours.state_dict())
        ours.fuse_projections()
        assert set(ours.state_dict()) == keys  # Hugging Face's names, no fused copy saved
        attn, mlp = ours.model.layers[0].self_attn, ours.model.layers[0].mlp
        assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()  # views: no second copy
        assert mlp.fused and mlp.gate_proj.weight.data_ptr() == mlp.gate_up_weight.data_ptr()
    ids = torch.randint(0, SMALL["vocab_size"], (1, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    cache = ContiguousKVCache(ours.config, 1, 100, torch.device("cpu"), torch.float32)
    cache.add(0, 100)
    got = ours(ids, cache, cache.plan([0], 100), all_logits=True)[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_architecture_flags():
    cfg = from_hf_config(_pair("qwen3-qknorm")[0].config)
    assert cfg.qk_norm and not cfg.attention_bias
    cfg = from_hf_config(_pair("qwen2-bias")[0].config)
    assert cfg.attention_bias and not cfg.qk_norm
    cfg = from_hf_config(_pair("gemma3")[0].config)
    assert cfg.sliding_windows == (32, None, 32) and cfg.global_layers == (1,)
    assert cfg.attn_scale == pytest.approx(24**-0.5)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_rmsnorm_kernel_matches_the_torch_path(device):
    """The one-launch Triton RMSNorm gives the torch norm's values, Llama style (scaled in bf16)
    and Gemma style (offset 1, float32 throughout), hidden and head rows. On the GPU, where the
    kernel rounds to bf16 as torch does (the interpreter truncates), the two agree exactly
    almost everywhere."""
    check_kernel(check_rmsnorm_kernel, device)


def check_rmsnorm_kernel(device: str) -> None:
    from kvdrive.models.layers import RMSNorm

    gen = torch.Generator().manual_seed(0)
    for shape, offset, dtype in (
        ((3, 2, 4096), 0.0, torch.bfloat16),
        ((2, 4, 1, 128), 0.0, torch.float32),
        ((2, 1, 640), 1.0, torch.bfloat16),
        ((5, 100), 1.0, torch.float32),
    ):
        norm = RMSNorm(shape[-1], 1e-6, offset)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(shape[-1], generator=gen) * 0.1 + (0 if offset else 1))
        norm = norm.to(device, dtype)
        x = (torch.randn(shape, generator=gen) * 3).to(device, dtype)
        want, got = norm(x, impl="torch"), norm(x, impl="triton")
        assert got.dtype == want.dtype and got.shape == want.shape
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: two roundings, each at most one step apart
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        if dtype == torch.bfloat16 and device == "cuda":
            assert (got == want).float().mean() > 0.95, (shape, (got == want).float().mean())


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_silu_mul_kernel_matches_the_torch_path(device):
    """The gated MLP's activation and product in one Triton launch gives torch's
    silu(gate) * up on a fused [gate | up] row: decode and prefill rows, a width that is not
    a power of two."""
    check_kernel(check_silu_mul_kernel, device)


def check_silu_mul_kernel(device: str) -> None:
    from kvdrive.models.layers import act_mul

    gen = torch.Generator().manual_seed(2)
    for shape, dtype in (
        ((2, 1, 2 * 4096), torch.bfloat16),
        ((1, 9, 2 * 300), torch.float32),
        ((3, 2 * 2500), torch.bfloat16),
    ):
        gu = (torch.randn(shape, generator=gen) * 3).to(device, dtype)
        want, got = act_mul(gu, "silu", impl="torch"), act_mul(gu, "silu", impl="triton")
        assert got.shape == want.shape == (*shape[:-1], shape[-1] // 2) and got.dtype == dtype
        # float32: exp's last bits; bf16: two roundings, each at most one step apart
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        if dtype == torch.bfloat16 and device == "cuda":
            assert (got == want).float().mean() > 0.95, (shape, (got == want).float().mean())


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_rope_kernel_matches_the_torch_path(device):
    """The one-launch Triton RoPE gives torch's rotation: exactly in float32, within bf16
    rounding otherwise; strided (transposed) queries, decode and prefill lengths."""
    check_kernel(check_rope_kernel, device)


def check_rope_kernel(device: str) -> None:
    from kvdrive.config import RopeSpec
    from kvdrive.models import rope

    gen = torch.Generator().manual_seed(1)
    for b, h, t, d, dtype in (
        (2, 4, 1, 64, torch.float32),
        (1, 3, 37, 128, torch.float32),
        (2, 8, 1, 128, torch.bfloat16),
        (2, 2, 20, 64, torch.bfloat16),
    ):
        x = torch.randn(b, t, h, d, generator=gen).to(device, dtype).transpose(1, 2)  # (B, H, T, D), strided
        positions = torch.randint(0, 5000, (b, t), generator=gen).to(device)
        cos, sin = rope.cos_sin(rope.inv_freq(RopeSpec(theta=10000.0), d, x.device), positions, dtype)
        want, got = rope.apply(x, cos, sin, impl="torch"), rope.apply(x, cos, sin, impl="triton")
        assert got.shape == want.shape and got.dtype == want.dtype
        layout = [[st for st, n in zip(y.stride(), y.shape, strict=True) if n > 1] for y in (got, want)]
        assert layout[0] == layout[1]  # torch's memory layout (the heads of a transposed projection)
        if dtype == torch.float32 and device == "cpu":
            assert torch.equal(got, want), (b, h, t, d)
        elif dtype == torch.float32:  # the GPU compiler fuses a product into the add (one rounding fewer)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:  # the interpreter truncates bf16 casts; on the GPU the compiler may keep products in fp32
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
            if device == "cuda":  # so within the roundings torch makes (three of them, each half an ulp)
                terms = (x.float() * cos.float()).abs() + (rope.rotate_half(x).float() * sin.float()).abs()
                assert ((got.float() - want.float()).abs() <= 2 * torch.finfo(dtype).eps * terms).all(), (b, h, t, d)
