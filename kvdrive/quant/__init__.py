"""Compressed KV for the tiers below the GPU.

* ``formats``: the storage formats (``bf16``, ``fp8``, ``int8``, ``int4``): byte sections of a stored
  group, ``quantize`` (torch, where the group is written behind) and ``dequantize`` (the twin);
* ``dequant``: ``dequant_rows``, the fetch that widens stored rows into typed groups
  (kernel: ``dequant_triton``).
"""

from kvdrive.quant.dequant import dequant_rows, dequant_rows_reference
from kvdrive.quant.formats import KV_DTYPES, check_kv_dtype, dequantize, quantize, stored_bytes

__all__ = [
    "KV_DTYPES",
    "check_kv_dtype",
    "dequant_rows",
    "dequant_rows_reference",
    "dequantize",
    "quantize",
    "stored_bytes",
]
