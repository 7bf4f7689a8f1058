"""Triton body of ``RMSNorm`` on CUDA (torch twin: ``kvdrive.models.layers.RMSNorm``).

NOTE: in torch a norm is seven kernels (cast, square, mean, add, rsqrt, two multiplies and a
cast); a decode step runs two norms a layer per part on the critical path of each layer's
chain (the fetch of the next layer waits for it). This kernel is one launch. One program per
row, the row in registers.
"""

import triton
import triton.language as tl


@triton.jit
def rmsnorm_kernel(x_ptr, w_ptr, out_ptr, n, eps, OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    inside = i < n
    x = tl.load(x_ptr + row * n + i, mask=inside, other=0.0)
    xf = x.to(tl.float32)
    normed = xf * tl.rsqrt(tl.sum(xf * xf, 0) / n + eps)
    w = tl.load(w_ptr + i, mask=inside, other=0.0)
    if OFFSET != 0.0:  # Gemma: x * (offset + w), all in float32
        y = normed * (OFFSET + w.to(tl.float32))
    else:  # Llama: w * x, normalised in float32, scaled in the input dtype
        y = w.to(tl.float32) * normed.to(x.dtype).to(tl.float32)
    tl.store(out_ptr + row * n + i, y.to(x.dtype), mask=inside)
