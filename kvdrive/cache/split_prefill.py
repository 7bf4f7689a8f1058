"""Split-KV chunk attention: a short chunk over a long prefix, partitioned over its keys.

SDPA's flash kernel runs one program per (sequence, head, 128-query block) and walks every
key in it, so a 256-token chunk of one sequence over a 128K-token prefix (32 query heads)
fills 64 programs on a 132-SM H100, each walking 128K keys. Here the chunk's attention is
cut in parts that each return their log-sum-exp and merge exactly (``merge_attention_many``):

(a) the prefix every query of the chunk sees (keys before the chunk), in P equal
    partitions run as ONE flash call: partitions are extra batch entries (a view of the
    contiguous K/V, no copy), and the query heads that share a KV head become extra query
    rows (non-causal, so the folding is exact; the flash op wants equal head counts);
(b) the last ``prefix mod P`` prefix keys and the chunk's own keys: causal aligned to the
    lower right, K/V repeated to the query heads (a few keys, a small copy).

On CUDA each part is ``aten._scaled_dot_product_flash_attention`` (fp16/bf16, head_dim a
multiple of 8 and <= 256; ``is_causal`` there means lower right, as ``causal_lower_right``
uses it); elsewhere a torch twin computes the same (out, lse) in fp32. The rule applies where
``KVDRIVE_SPLIT_PREFILL=1`` (off by default: the CUDA path has not been timed on a GPU).

With ``KVDRIVE_PREFILL_KERNEL=cudnn`` every chunk over a prefix runs as these two parts at
least (P = 1: the whole prefix unmasked, then the chunk's own keys square-causal), and each
part whose mask cuDNN can express (none, or causal over a square) runs
``aten._scaled_dot_product_cudnn_attention``: a chunk aligned to the lower right is a mask
only the flash kernel takes in one call, while transformers' square causal forward is free to
take cuDNN's faster kernel. If cuDNN refuses a shape, the flash op takes over for the process.
"""

from __future__ import annotations

import functools
import warnings

import torch

from kvdrive import env
from kvdrive.retrieval.merge import merge_attention_many

SPLIT_MIN_PREFIX = 8192  # keys every query sees before a split pays for its merge
MIN_PARTITION = 2048  # keys per partition, at least: a program's walk stays long
QUERY_BLOCK = 128  # query rows per flash program
WAVES = 2  # programs to aim for, in multiples of the SM count
FLASH_DTYPES = (torch.float16, torch.bfloat16)

_cudnn_refused = False  # set once cuDNN rejects a shape: the flash op serves the rest of the process
force: bool | None = None  # None: the rule decides where KVDRIVE_SPLIT_PREFILL=1; True / False: always / never split


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def plan_partitions(batch: int, kv_heads: int, rows: int, prefix: int, sms: int) -> int:
    """Prefix partitions P for one chunk (1: do not split). ``rows``: query rows per KV head
    (query heads per KV head x chunk length). Splits one sequence whose flash call fills fewer
    than ``WAVES x sms`` programs over a prefix of at least ``SPLIT_MIN_PREFIX`` keys, into just
    enough partitions of at least ``MIN_PARTITION`` keys to fill them. Several sequences keep
    one call: their partitions would not be a view of the K/V (a copy of the prefix)."""
    if batch != 1 or prefix < SPLIT_MIN_PREFIX:
        return 1
    programs = kv_heads * -(-rows // QUERY_BLOCK)
    want = -(-WAVES * sms // programs)
    return max(1, min(want, prefix // MIN_PARTITION))


def num_partitions(q: torch.Tensor, k: torch.Tensor, prefix: int) -> int:
    """The dispatch of ``chunk_attention``: P for q (B, H_q, T, D) over k (B, H_kv, prefix + T, D)
    whose first ``prefix`` keys every query sees. On CUDA by ``plan_partitions`` where the flash
    op takes the inputs; elsewhere never; ``force`` overrides the count (at least 2 when on)."""
    b, hq, t, d = q.shape
    if force is False or b != 1 or prefix < 2 or (force is None and not env.split_prefill_enabled()):
        return 1
    p = 1
    if q.is_cuda:
        if q.dtype not in FLASH_DTYPES or d % 8 or d > 256:
            return 1
        p = plan_partitions(b, k.shape[1], hq // k.shape[1] * t, prefix, _sm_count(q.device.index or 0))
    return min(max(p, 2), prefix) if force else p


def two_calls(q: torch.Tensor, prefix: int) -> bool:
    """Whether a chunk q (B, H_q, T, D) over ``prefix`` keys every query sees runs as the prefix
    and its own keys apart (P = 1) though the rule does not split it: with the cuDNN kernel, on
    CUDA, for inputs it takes, past the first chunk."""
    return (
        force is not False
        and prefix > 0
        and q.is_cuda
        and q.shape[2] > 1
        and env.prefill_kernel() == "cudnn"
        and not _cudnn_refused
        and q.dtype in FLASH_DTYPES
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
    )


def split_chunk_attention(q, k, v, prefix: int, parts: int, scale: float) -> torch.Tensor:
    """Exact causal attention of a chunk, split as above. q (B, H_q, T, D); k/v (B, H_kv,
    prefix + T, D): ``prefix`` keys every query sees, then the chunk's own. Returns (B, H_q, T, D)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    rep = hq // hkv
    n = prefix // parts  # keys per partition; the rest go with the chunk's own keys
    cut = parts * n

    def partitioned(x):  # (B, H_kv, L, D) -> (B * P, H_kv, n, D), a view when B == 1
        return x[:, :, :cut].unflatten(2, (parts, n)).transpose(1, 2).reshape(b * parts, hkv, n, d)

    qg = q.reshape(b, 1, hkv, rep * t, d).expand(b, parts, hkv, rep * t, d).reshape(b * parts, hkv, rep * t, d)
    o_a, lse_a = _attend(qg.contiguous(), partitioned(k), partitioned(v), scale, causal=False)
    o_a = o_a.reshape(b, parts, hq, t, d).transpose(0, 1)  # (P, B, H_q, T, D); rows were (rep, T)
    lse_a = lse_a.reshape(b, parts, hq, t).transpose(0, 1)  # (P, B, H_q, T)
    k_b = k[:, :, cut:].repeat_interleave(rep, 1)  # (B, H_q, prefix - cut + T, D)
    v_b = v[:, :, cut:].repeat_interleave(rep, 1)
    o_b, lse_b = _attend(q.contiguous(), k_b, v_b, scale, causal=True)
    out, _ = merge_attention_many(torch.cat((o_a, o_b[None])), torch.cat((lse_a, lse_b[None])))
    return out


def _attend(q, k, v, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (N, H, R, D) in q's dtype, lse (N, H, R) fp32) of q (N, H, R, D) over k/v (N, H, S, D),
    equal head counts; ``causal``: aligned to the lower right (query r sees keys <= S - R + r)."""
    r, s = q.shape[2], k.shape[2]
    if q.is_cuda:
        cudnn = (not causal or r == s) and not _cudnn_refused and env.prefill_kernel() == "cudnn"
        if cudnn and (res := _attend_cudnn(q, k, v, scale, causal)) is not None:
            return res
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
        return out, lse[..., :r]
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (N, H, R, S)
    if causal:
        visible = torch.ones(r, s, dtype=torch.bool, device=q.device).tril(s - r)
        logits = logits.masked_fill(~visible, float("-inf"))
    lse = logits.logsumexp(-1)
    return torch.matmul((logits - lse[..., None]).exp(), v.float()).to(q.dtype), lse


def _attend_cudnn(q, k, v, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``_attend`` through cuDNN (no mask, or causal over a square); None where cuDNN refuses."""
    global _cudnn_refused
    try:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )[:2]
    except RuntimeError as e:  # a shape or build cuDNN does not support: the flash op is exact too
        _cudnn_refused = True
        warnings.warn(f"cuDNN attention refused a prefill chunk ({e}); using the flash kernel", stacklevel=2)
        return None
    return out, lse.reshape(q.shape[:3]).float()
