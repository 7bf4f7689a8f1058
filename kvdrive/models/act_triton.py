"""Triton body of ``act_mul`` for SiLU on CUDA (torch twin: ``kvdrive.models.layers.act_mul``).

NOTE: the gated MLP's ``silu(gate) * up`` is two torch kernels on each micro-batch's serial
chain; with gate and up as one GEMM
(``GatedMLP.fuse``) this reads its (rows, 2I) output once and writes (rows, I), in one launch,
with torch's roundings: the SiLU rounded to the dtype, then the product.
"""

import triton
import triton.language as tl


@triton.jit
def silu_mul_kernel(gu_ptr, out_ptr, inner, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = i < inner
    g = tl.load(gu_ptr + row * 2 * inner + i, mask=m, other=0.0)
    u = tl.load(gu_ptr + row * 2 * inner + inner + i, mask=m, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + row * inner + i, (act * u.to(tl.float32)).to(g.dtype), mask=m)
