"""Time a prefill chunk's attention at the Llama-3.1-8B heads (32 query heads over 8 KV heads,
D = 128, bf16) by kernel: one causal flash call aligned to the lower right (what
``chunk_attention`` runs by default), and the prefix and the chunk as two calls merged by
log-sum-exp (``split_prefill.split_chunk_attention`` with P = 1) through the flash op or
through cuDNN (``KVDRIVE_PREFILL_KERNEL``), and kvdrive's own Triton kernel (``flash_prefill``). For reference, one square causal SDPA call over a
32K prompt (transformers' forward) with the default backend and each backend forced, and the
kernels the profiler sees. CUDA events, 2 warm-up calls (cuDNN builds its plan for a shape in
them), the mean of 5.

Run on a CUDA machine from the repo root: ``python3 bench/scripts/chunk_attention_kernels.py OUT.json``.
"""

import functools
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, os.getcwd())
from kvdrive.cache import flash_prefill, split_prefill
from kvdrive.results import write_result

HQ, HKV, D = 32, 8, 128
SCALE = D**-0.5


def seconds(fn, reps: int = 5) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps / 1e3


def attention_kernels(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    words = ("attn", "fmha", "flash", "cudnn", "sdpa")
    cuda = torch.autograd.DeviceType.CUDA
    return sorted(
        {e.name[:90] for e in prof.events() if e.device_type == cuda and any(w in e.name.lower() for w in words)}
    )


def with_tflops(row: dict, flops: float) -> dict:
    for key in [k for k in row if k.endswith("_s")]:
        row[key[:-2] + "_tflops"] = flops / row[key] / 1e12
    return row


def chunk_rows(dev, dt) -> list[dict]:
    rows = []
    for c in (2048, 8192):
        for prefix in (8192, 30720, 131072 - c):
            q = torch.randn(1, HQ, c, D, device=dev, dtype=dt)
            k, v = torch.randn(2, 1, HKV, prefix + c, D, device=dev, dtype=dt)
            mask = causal_lower_right(c, prefix + c)
            one_call = functools.partial(
                F.scaled_dot_product_attention, q, k, v, attn_mask=mask, scale=SCALE, enable_gqa=True
            )
            two_calls = functools.partial(split_prefill.split_chunk_attention, q, k, v, prefix, 1, SCALE)
            row = {"chunk": c, "prefix": prefix, "flash_one_call_s": seconds(one_call)}
            triton_call = functools.partial(flash_prefill.chunk_attention_triton, q, k, v, SCALE)
            row["triton_one_call_s"] = seconds(triton_call)  # K/V by tensor descriptors (TMA) on Hopper
            row["triton_pointer_loads_s"] = seconds(functools.partial(triton_call, tma=False))
            row["triton_max_abs_diff_vs_flash"] = (one_call().float() - triton_call().float()).abs().max().item()
            for kernel in ("flash", "cudnn"):
                os.environ["KVDRIVE_PREFILL_KERNEL"] = kernel
                row[f"{kernel}_two_calls_s"] = seconds(two_calls)
            row["cudnn_refused"] = split_prefill._cudnn_refused
            if c == 2048 and prefix == 131072 - c:
                row["cudnn_kernels"] = attention_kernels(two_calls)
            row["max_abs_diff_vs_one_call"] = (one_call().float() - two_calls().float()).abs().max().item()
            os.environ["KVDRIVE_PREFILL_KERNEL"] = "flash"
            rows.append(with_tflops(row, 4 * HQ * D * (c * prefix + c * (c + 1) / 2)))
            print(json.dumps(row), flush=True)
    return rows


# Tiles of the Triton kernel to sweep: (BLOCK_M, BLOCK_N, num_warps, num_stages)
TILES = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 8, 3)]
TILES += [(128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2)]


def tile_rows(dev, dt, c: int = 2048, prefix: int = 131072 - 2048) -> list[dict]:
    """The Triton kernel's time by tile and load path (tensor descriptors or pointers) at the
    deepest 2048-token chunk of a 128K prompt."""
    q = torch.randn(1, HQ, c, D, device=dev, dtype=dt)
    k, v = torch.randn(2, 1, HKV, prefix + c, D, device=dev, dtype=dt)
    flops = 4 * HQ * D * (c * prefix + c * (c + 1) / 2)
    rows, default = [], flash_prefill._blocks
    try:
        for tile, tma in itertools.product(TILES, (True, False)):
            flash_prefill._blocks = lambda q, tile=tile: tile
            try:
                call = functools.partial(flash_prefill.chunk_attention_triton, q, k, v, SCALE, tma=tma)
                row = {"tile": list(tile), "tma": tma, "s": seconds(call)}
                row["tflops"] = flops / row["s"] / 1e12
            except Exception as e:  # a tile that does not fit the SM's shared memory
                row = {"tile": list(tile), "tma": tma, "error": str(e)[:200]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        flash_prefill._blocks = default
    return rows


def square_row(dev, dt, length: int = 32768) -> dict:
    q = torch.randn(1, HQ, length, D, device=dev, dtype=dt)
    k, v = (x.repeat_interleave(HQ // HKV, 1) for x in torch.randn(2, 1, HKV, length, D, device=dev, dtype=dt))
    call = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE)  # noqa: E731
    row = {"square_causal_len": length, "default_s": seconds(call, 3), "default_kernels": attention_kernels(call)}
    k1, v1 = (x[:, :: HQ // HKV].contiguous() for x in (k, v))  # the kernel reads KV heads in place
    row["triton_s"] = seconds(functools.partial(flash_prefill.chunk_attention_triton, q, k1, v1, SCALE), 3)
    for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        try:
            with sdpa_kernel([backend]):
                row[f"{name}_s"] = seconds(call, 3)
        except RuntimeError as e:
            row[f"{name}_error"] = str(e)[:200]
    print(json.dumps(row), flush=True)
    return with_tflops(row, 4 * HQ * D * length * (length + 1) / 2)


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    rows = chunk_rows(dev, dt) + [square_row(dev, dt)] + [{"triton_tiles": tile_rows(dev, dt)}]
    config = {
        "heads": [HQ, HKV, D],
        "dtype": "bfloat16",
        "timing": "CUDA events, 2 warm-up calls, mean of 5 (3 square)",
    }
    notes = ["TFLOP/s count causal attention FLOPs: 4 * H_q * D * visible query-key pairs"]
    write_result(sys.argv[1], "chunk_attention_kernels", config, rows, notes)


if __name__ == "__main__":
    main()
