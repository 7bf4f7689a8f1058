"""Triton body of ``rope.apply`` on CUDA (torch twin: ``kvdrive.models.rope.apply``).

NOTE: in torch the rotation is five kernels (two multiplies, a negation, a concatenation, an
add) for the queries and five for the keys of every layer, on each micro-batch's serial
chain between the QKV projection and the next fetch. Here it is one launch, written with
torch's roundings: each product rounded to the input dtype, then the sum. On a GPU the
compiled kernel matches torch within those roundings but not bit for bit (elements one ulp
apart in bfloat16; in float32 the product is fused into the add): the compiler does not keep
every intermediate rounding, so tests bound the difference.
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T"])  # a chunk of any length: one compiled kernel
def rope_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    H,
    T,
    sx_b,
    sx_h,
    sx_t,
    so_b,
    so_h,
    so_t,
    sc_b,
    sc_t,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    half: tl.constexpr = D // 2
    rows = (t < T)[:, None]
    x_row = x_ptr + b * sx_b + h * sx_h + t[:, None] * sx_t
    x = tl.load(x_row + d[None, :], mask=rows, other=0.0)
    partner = tl.load(x_row + ((d + half) % D)[None, :], mask=rows, other=0.0)  # rotate_half: [-x2, x1]
    rotated = tl.where((d < half)[None, :], -partner.to(tl.float32), partner.to(tl.float32))
    table = b * sc_b + t[:, None] * sc_t + d[None, :]
    c = tl.load(cos_ptr + table, mask=rows, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + table, mask=rows, other=0.0).to(tl.float32)
    a = (x.to(tl.float32) * c).to(x.dtype).to(tl.float32)
    r = (rotated * s).to(x.dtype).to(tl.float32)
    tl.store(out_ptr + b * so_b + h * so_h + t[:, None] * so_t + d[None, :], (a + r).to(x.dtype), mask=rows)
