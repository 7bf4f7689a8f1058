"""The Triton kernels compile for Hopper (sm_90) on a machine without a GPU: the interpreter
runs their logic on the CPU but not Triton's compiler, which rejects what the interpreter lets
pass (a kernel reading a plain global, for one, which broke the split selection on its first
GPU run)."""

import pytest

triton = pytest.importorskip("triton")

SCORES = {"scores_ptr": "*fp32", "s_stride_b": "i32", "s_stride_h": "i32", "num_groups_ptr": "*i64"}
BUDGET = {"N": "i32", "P": "i32", "budget_groups": "i32"}
FORCED = {"n_sink": "i32", "n_window": "i32", "floor": "i32"}
SPLIT = {"num_groups_ptr": "*i64", "ordered_ptr": "*i64", "hist_ptr": "*i32"}


def _kernels():
    from kvdrive.models import act_triton as act_kernel
    from kvdrive.models import norm_triton as norm_kernel
    from kvdrive.models import rope_triton as rope_kernel
    from kvdrive.quant import dequant_triton
    from kvdrive.retrieval import score_triton as score_kernel
    from kvdrive.retrieval import select_split_triton as split
    from kvdrive.retrieval import select_triton as one
    from kvdrive.storage import gather_triton
    from kvdrive.tiered import selection_cache_triton as cache_kernels
    from kvdrive.tiered import tier_ops_triton as tier_kernels

    yield (
        one.select_shared_kernel,
        {**SCORES, "groups_ptr": "*i32", "count_ptr": "*i32", "key_ptr": "*fp32", **BUDGET, **FORCED},
        {"H": 8, "BLOCK_N": 8192, "BLOCK_P": 128},
    )
    yield (
        split.split_stats_kernel,
        {**SCORES, "stats_ptr": "*fp32", "hist_ptr": "*i32", **BUDGET, **FORCED},
        {"H": 8, "CHUNK": 1024},
    )
    yield (
        split.split_mass_kernel,
        {
            **SCORES,
            "stats_ptr": "*fp32",
            "key_ptr": "*fp32",
            "ordered_ptr": "*i64",
            "hist_ptr": "*i32",
            **BUDGET,
            **FORCED,
        },
        {"H": 8, "CHUNK": 1024, "C_BLOCK": 8},
    )
    for p in (1, 2, 3):
        yield split.split_hist_kernel, {**SPLIT, **BUDGET, "floor": "i32"}, {"PASS": p, "CHUNK": 1024}
    yield split.split_count_kernel, {**SPLIT, "counts_ptr": "*i32", **BUDGET, "floor": "i32"}, {"CHUNK": 1024}
    yield (
        split.split_write_kernel,
        {**SPLIT, "counts_ptr": "*i32", "groups_ptr": "*i32", "count_ptr": "*i32", **BUDGET, "floor": "i32"},
        {"CHUNK": 1024, "C_BLOCK": 8, "BLOCK_P": 128},
    )
    for offset, block in ((0.0, 4096), (1.0, 1024)):
        yield (
            norm_kernel.rmsnorm_kernel,
            {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "n": "i32", "eps": "fp32"},
            {"OFFSET": offset, "BLOCK": block},
        )
    yield (
        rope_kernel.rope_kernel,
        {
            "x_ptr": "*bf16",
            "cos_ptr": "*bf16",
            "sin_ptr": "*bf16",
            "out_ptr": "*bf16",
            **dict.fromkeys(("H", "T", "sx_b", "sx_h", "sx_t", "so_b", "so_h", "so_t", "sc_b", "sc_t"), "i32"),
        },
        {"D": 128, "BLOCK_T": 16},
    )
    for minmax, mean in ((True, False), (False, True)):
        yield (
            score_kernel.group_score_kernel,
            {
                "q_ptr": "*bf16",
                "s_ptr": "*bf16",
                "count_ptr": "*i64",
                "out_ptr": "*fp32",
                "N": "i32",
                "scale": "fp32",
                **dict.fromkeys(("sq_b", "sq_h", "ss_b", "ss_n", "ss_h", "so_b", "so_h"), "i32"),
            },
            {"R": 4, "D": 128, "MINMAX": minmax, "MEAN": mean, "BLOCK_N": 64},
        )
    i32 = ("groups_stride", "scores_stride", "n_scores", "table_stride", "slot_stride", "scratch_stride", "P", "CAP")
    for counts, affine, opened in ((True, True, True), (False, False, False), (True, True, False)):
        yield (
            cache_kernels.ensure_kernel,
            {
                "rows_ptr": "*i64",
                "groups_ptr": "*i32" if counts else "*i64",
                "listed_ptr": "*i32" if counts else "*i1",
                "src_ptr": "*i64",
                "src_n": "i64",
                "open_ptr": "*i64",
                "raw_from": "i64",
                "src_out_ptr": "*i64",
                "scores_ptr": "*fp32",
                "table_ptr": "*i32",
                "owner_ptr": "*i64",
                "stamp_ptr": "*fp32",
                "fresh_ptr": "*u8",
                "counters_ptr": "*i64",
                "step_ptr": "*fp32",
                "scratch_ptr": "*i64",
                "pages_ptr": "*i32",
                "dst_ptr": "*i64",
                "live_ptr": "*i32",
                "TRASH": "i64",
                **dict.fromkeys(i32, "i32"),
            },
            {
                "LOOKAHEAD": True,
                "PREFETCH": not counts,
                "COUNTS": counts,
                "AFFINE": affine,
                "OPEN": opened,
                "BLOCK_P": 256,
                "BLOCK_C": 512,
            },
        )
    for has_cache in (True, False):
        yield (
            tier_kernels.append_token_kernel,
            {
                "k_ptr": "*bf16",
                "v_ptr": "*bf16",
                "off_ptr": "*i64",
                "host_ptr": "*bf16",
                "host_row_ptr": "*i64",
                "cache_ptr": "*bf16",
                "table_ptr": "*i32",
                "slot_ptr": "*i64",
                "group_ptr": "*i64",
                "TRASH": "i64",
                **dict.fromkeys(
                    ("sk_b", "sk_h", "sv_b", "sv_h", "host_stride", "cache_stride", "table_stride", "CAP", "H", "G"),
                    "i32",
                ),
            },
            {"HAS_CACHE": has_cache, "D": 128, "BLOCK_D": 128},
        )
    rows = {"src_ptr": "*i32", "src_idx_ptr": "*i64", "dst_ptr": "*i32", "dst_idx_ptr": "*i64"}
    rows.update(src_stride="i64", dst_stride="i64", words="i32")
    yield gather_triton.copy_rows_kernel, rows, {"BLOCK": 2048}
    looped = {**rows, "live_ptr": "*i32", **dict.fromkeys(("n_tiles", "tiles_per_row", "programs"), "i32")}
    yield gather_triton.copy_rows_persistent_kernel, looped, {"BLOCK": 2048, "LIVE": True}
    for int4, int8, raw in ((False, False, False), (True, False, False), (False, False, True), (True, False, True)) + (
        (False, True, False),
        (False, True, True),
    ):
        sig = {
            "src_ptr": "*u8",
            "src_idx_ptr": "*i64",
            "src_stride": "i64",
            "dst_ptr": "*bf16",
            "dst_idx_ptr": "*i64",
            "dst_stride": "i64",
            "raw_ptr": "*bf16",
            "raw_stride": "i64",
            "raw_from": "i64",
            **dict.fromkeys(("H", "G", "D", "vq_off", "ks_off", "kz_off", "vs_off", "vz_off"), "i32"),
        }
        consts = {
            "INT4": int4,
            "INT8": int8,
            "HAS_RAW": raw,
            "LIVE": raw,  # the tiered fetch: a raw source and a packed miss list
            "BLOCK_H": 8 if int4 else 4,  # the 8B shape's launch: 8192-element tiles
            "BLOCK_G": 16,
            "BLOCK_D": 64 if int4 else 128,
        }
        yield (
            dequant_triton.dequant_rows_kernel,
            {**sig, "n_tiles": "i32", "programs": "i32", "live_ptr": "*i32"},
            consts,
        )
    yield act_kernel.silu_mul_kernel, {"gu_ptr": "*bf16", "out_ptr": "*bf16", "inner": "i32"}, {"BLOCK": 2048}
    from kvdrive.cache import chunk_attention_triton as prefill_kernel

    strides = ("stride_qb", "stride_qh", "stride_qt", "stride_kb", "stride_kh", "stride_ks")
    strides += ("stride_vb", "stride_vh", "stride_vs", "stride_ob", "stride_oh", "stride_ot")
    for d, block_m, block_n, lse, paged, tma in (
        (128, 128, 64, False, True, False),
        (64, 128, 64, True, False, False),
        (256, 64, 32, False, False, False),
        (128, 128, 64, False, True, True),
        (128, 128, 64, True, False, True),
    ):
        kv = "*bf16"
        if tma:  # tensor descriptors: the pool as (pages * 2 * H_kv, G, D), or (B, H_kv, S, D)
            kv = f"tensordesc<bf16[1,{block_n},{d}]>" if paged else f"tensordesc<bf16[1,1,{block_n},{d}]>"
        yield (
            prefill_kernel.chunk_attention_kernel,
            {
                **dict.fromkeys(("q_ptr", "o_ptr"), "*bf16"),
                **dict.fromkeys(("k_ptr", "v_ptr"), kv),
                "lse_ptr": "*fp32",
                **dict.fromkeys(strides, "i32"),
                "rows_ptr": "*i32",
                "stride_rb": "i32",
                "T": "i32",
                "S": "i32",
                "scale_log2": "fp32",
            },
            {
                "HQ": 32,
                "REP": 4,
                "BLOCK_D": d,
                "BLOCK_M": block_m,
                "BLOCK_N": block_n,
                "G": 64,
                "PAGED": paged,
                "HAS_LSE": lse,
                "IEEE": False,
                "INTERPRET": False,
                "TMA": tma,
            },
        )
    yield (
        tier_kernels.write_tokens_kernel,
        {
            "k_ptr": "*bf16",
            "v_ptr": "*bf16",
            "dst_ptr": "*bf16",
            "row_stride": "i64",
            "row_ptr": "*i64",
            "off_ptr": "*i64",
            **dict.fromkeys(("T", "H", "G", "sk_b", "sk_h", "sk_t", "sv_b", "sv_h", "sv_t"), "i32"),
        },
        {"D": 128, "BLOCK_D": 128},
    )


def test_kernels_compile_for_hopper():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = []
    for fn, signature, constexprs in _kernels():
        src = ASTSource(fn=fn, signature={**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert ".entry" in compiled.asm["ptx"], fn.fn.__name__  # a PTX kernel came out
        names.append(fn.fn.__name__)
    assert len(names) == 33


def _specialization(kernel, lengths: dict, constexprs: dict):
    """What Triton keys a compiled kernel on for these arguments (pointers as one bf16 tensor,
    every other integer 128, ``lengths`` as given), computed for sm_90 without a GPU."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))
    x = torch.zeros(64, dtype=torch.bfloat16)
    args = [
        x if p.name.endswith("_ptr") else lengths.get(p.name, 128) for p in kernel.params if p.name not in constexprs
    ]
    return binder(*args, **constexprs)[1]


@pytest.mark.parametrize("kernel", ["rope", "write_tokens", "chunk_attention"])
def test_kernels_that_take_a_chunk_compile_once_for_every_length(kernel):
    """A chunk of 2040 tokens after ones of 2048 (a step budget shared with decode makes such
    lengths) must not compile a new kernel while every running stream waits: Triton keys ints on
    being 1 or a multiple of 16 unless told not to."""
    from kvdrive.cache import chunk_attention_triton
    from kvdrive.models import rope_triton
    from kvdrive.tiered import tier_ops_triton

    fn, constexprs = {
        "rope": (rope_triton.rope_kernel, {"D": 128, "BLOCK_T": 16}),
        "write_tokens": (tier_ops_triton.write_tokens_kernel, {"D": 128, "BLOCK_D": 128}),
        "chunk_attention": (
            chunk_attention_triton.chunk_attention_kernel,
            {"HQ": 32, "REP": 4, "BLOCK_D": 128, "BLOCK_M": 128, "BLOCK_N": 64, "G": 64, "PAGED": True}
            | {"HAS_LSE": False, "IEEE": False, "INTERPRET": False, "TMA": False},
        ),
    }[kernel]
    keys = [_specialization(fn, {"T": t, "S": t + p}, constexprs) for t in (1, 16, 2040, 2048) for p in (0, 4095)]
    assert all(k == keys[0] for k in keys)
