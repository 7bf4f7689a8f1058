"""The plain cache: every token of every layer in one preallocated tensor per layer.

Memory: ``max_seqs x max_len`` tokens for every layer, allocated once at
construction (no allocation per step). Attention is exact (torch SDPA) over the
cached prefix, causal and optionally within a sliding window. A forward whose sequences
share one start (a prefill chunk, eager decode) attends through ``chunk_attention``
with no materialised mask (SDPA's flash kernel on CUDA); a ragged batch and a
CUDA-graph decode step attend under an explicit mask. This is the reference every
other cache is measured against; ``PagedKVCache`` (``paged.py``) is the plain cache ``LLM``
uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kvdrive import env
from kvdrive.cache import flash_prefill, split_prefill
from kvdrive.cache.base import ForwardBatch, KVCache, LayerSpec, TierBytes
from kvdrive.cache.slots import SequenceSlots, SlotTensors
from kvdrive.config import ModelConfig


def layer_specs(config: ModelConfig) -> tuple[LayerSpec, ...]:
    return tuple(
        LayerSpec(window=w, scale=config.attn_scale, softcap=config.attn_logit_softcap) for w in config.sliding_windows
    )


def attention_mask(start: torch.Tensor, num_new: int, kv_len: int, window: int | None) -> torch.Tensor:
    """(B, 1, T, L) bool: key j visible to new token t of sequence b.

    Query position is start[b] + t; keys at positions <= query (and > query - window).
    """
    q_pos = start[:, None] + torch.arange(num_new, device=start.device)  # (B, T)
    k_pos = torch.arange(kv_len, device=start.device)  # (L,)
    visible = k_pos[None, None, :] <= q_pos[:, :, None]  # (B, T, L)
    if window is not None:
        visible &= k_pos[None, None, :] > q_pos[:, :, None] - window
    return visible[:, None]


def sdpa(q, k, v, mask, scale: float, softcap: float | None) -> torch.Tensor:
    """Exact attention; q (B, H_q, T, D), k/v (B, H_kv, L, D), mask broadcast to (B, 1, T, L) or
    None (every key visible). GQA by head grouping; softcap in fp32 with the logits materialised."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    logits = torch.tanh(logits / softcap) * softcap
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.matmul(logits.softmax(-1), v.float()).to(q.dtype)


def chunk_attention(q, k, v, start: int, spec: LayerSpec, k_start: int = 0) -> torch.Tensor:
    """Exact attention of T new tokens at positions ``start .. start+T-1`` of every sequence (one
    shared start) with no (T x L) mask built where a kernel can do without.

    q (B, H_q, T, D); k/v (B, H_kv, L, D) hold the keys at positions ``k_start ..`` up to at
    least ``start + T - 1`` (later ones are ignored); ``k_start`` must not pass the first key the
    chunk sees (0 for a global layer). Returns (B, H_q, T, D).

    * a window that cuts keys (T > 1, chunk past the window): a mask over only the keys the
      window spans, (T x (W + T - 1)), whatever the prefix length;
    * softcap: the exact fp32 path of ``sdpa`` (SDPA has no score hook);
    * a short chunk of one sequence over a long prefix every query sees (global layers, and
      windows that cut no key): split-KV (``split_prefill``), the prefix in partitions of one
      flash call merged by log-sum-exp, where ``num_partitions`` finds the flash call too
      narrow for the GPU, or in two parts where ``KVDRIVE_PREFILL_KERNEL=cudnn`` (the
      prefix, then the chunk square-causal, each through cuDNN's kernel);
    * ``KVDRIVE_PREFILL_KERNEL=triton``: kvdrive's own flash kernel (``flash_prefill``), any
      prefix length, no mask, no plan;
    * T = 1: one query sees every key of its span, SDPA with no mask;
    * a chunk with no prefix under ``KVDRIVE_PREFILL_KERNEL=cudnn``: square causal through SDPA's
      ``is_causal``, which may take cuDNN's kernel (the lower-right mask only flash takes);
    * otherwise causal attention aligned to the lower right (``causal_lower_right``), which
      SDPA runs in its flash kernel on CUDA for fp16/bf16 (GQA native, no K/V copy); elsewhere
      torch materialises the mask itself.
    """
    t = q.shape[2]
    end = start + t
    lo = k_start if spec.window is None else max(k_start, start - spec.window + 1)  # first key seen
    k, v = k[:, :, lo - k_start : end - k_start], v[:, :, lo - k_start : end - k_start]  # (B, H_kv, S, D)
    span = end - lo
    if spec.window is not None and end - spec.window > lo:  # the last queries no longer see the first keys
        q_pos = torch.arange(start, end, device=q.device)[:, None]  # (T, 1)
        k_pos = torch.arange(lo, end, device=q.device)[None, :]  # (1, S)
        mask = (k_pos <= q_pos) & (k_pos > q_pos - spec.window)
        return grouped_sdpa(q, k, v, mask[None, None], spec.scale, spec.softcap)
    if spec.softcap is None and flash_prefill.runs(q, k.shape[1], k.shape[2]):
        return flash_prefill.chunk_attention_triton(q, k, v, spec.scale)
    if spec.softcap is None and (
        (parts := split_prefill.num_partitions(q, k, span - t)) > 1 or split_prefill.two_calls(q, span - t)
    ):
        return split_prefill.split_chunk_attention(q, k, v, span - t, parts, spec.scale)
    if t == 1:  # one query sees every key of its span
        return sdpa(q, k, v, None, spec.scale, spec.softcap)
    if spec.softcap is not None:
        mask = torch.ones(t, span, dtype=torch.bool, device=q.device).tril(span - t)
        return sdpa(q, k, v, mask[None, None], spec.scale, spec.softcap)
    gqa = k.shape[1] != q.shape[1]
    if t == span and env.prefill_kernel() == "cudnn":  # square causal: SDPA may pick cuDNN, as in transformers
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=spec.scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_lower_right(t, span), scale=spec.scale, enable_gqa=gqa
    )


def grouped_sdpa(q, k, v, mask, scale: float, softcap: float | None) -> torch.Tensor:
    """Masked GQA attention without copying K/V: the query heads that share a KV head
    become extra query rows. q (B, H_q, T, D), k/v (B, H_kv, L, D), mask (B, 1, T, L)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    rep = hq // hkv
    if rep == 1 or softcap is not None:
        return sdpa(q, k, v, mask, scale, softcap)
    qg = q.reshape(b, hkv, rep * t, d)  # rows ordered (rep, T)
    mg = mask[:, :, None].expand(mask.shape[0], 1, rep, t, mask.shape[-1]).reshape(-1, 1, rep * t, mask.shape[-1])
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mg, scale=scale)
    return out.reshape(b, hq, t, d)


class ContiguousKVCache(KVCache):
    supports_cuda_graphs = True  # plan(start=...) gives fixed shapes for replay
    supports_graph_span = True

    def __init__(self, config: ModelConfig, max_seqs: int, max_len: int, device: torch.device, dtype: torch.dtype):
        self.layer_specs = layer_specs(config)
        self.max_seqs, self.max_len = max_seqs, max_len
        self.device, self.dtype = device, dtype
        shape = (max_seqs, config.num_key_value_heads, max_len, config.head_dim)  # (S, H_kv, L, D)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.seqs = SequenceSlots(max_seqs, max_len)
        self._slot_tensor = SlotTensors(device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def tier_bytes(self) -> dict[str, TierBytes]:
        """The device's KV: committed tokens of every sequence against the whole allocation."""
        per_token = self.nbytes // (self.max_seqs * self.max_len)
        return {"gpu": TierBytes(self.seqs.tokens() * per_token, self.nbytes)}

    def add(self, seq_id: int, max_tokens: int, prompt_tokens: int | None = None) -> None:
        self.seqs.add(seq_id, max_tokens)

    def free(self, seq_id: int) -> None:
        self.seqs.free(seq_id)

    def length(self, seq_id: int) -> int:
        return self.seqs.length(seq_id)

    def plan(self, seq_ids, num_new: int, start: torch.Tensor | None = None, span: int | None = None) -> ForwardBatch:
        """``start``: a device tensor (B,) of cached lengths to plan against instead of the
        host's record. CUDA-graph decode passes its static buffer here: every tensor the
        forward then uses is derived on the GPU from it, and attention spans the first
        ``span`` positions (default the whole allocation, ``max_len``) under a mask, so shapes
        stay fixed across replays while every length stays below ``span``."""
        seq_ids = tuple(seq_ids)
        starts = self.seqs.starts(seq_ids, num_new)
        slots = [self.seqs.slot(s) for s in seq_ids]
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        static = start is not None
        start_t = start if static else torch.tensor(starts, device=self.device)
        meta = _Meta(
            slot_index=slice(slots[0], slots[0] + len(slots)) if contiguous else self._slot_tensor(slots),
            start=start_t,
            kv_len=min(span or self.max_len, self.max_len) if static else max(starts) + num_new,
            uniform_start=not static and len(set(starts)) == 1,
        )
        positions = start_t[:, None] + torch.arange(num_new, device=self.device)  # (B, T)
        return ForwardBatch(seq_ids=seq_ids, start=starts, num_new=num_new, positions=positions, meta=meta)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> None:
        m: _Meta = batch.meta
        if m.uniform_start:
            s = batch.start[0]
            self.k[layer][m.slot_index, :, s : s + batch.num_new] = k
            self.v[layer][m.slot_index, :, s : s + batch.num_new] = v
            return
        # Ragged starts: scatter each new token at its own position.
        slots = _as_index(m.slot_index, self.device)[:, None].expand_as(batch.positions)  # (B, T)
        self.k[layer][slots, :, batch.positions] = k.transpose(1, 2)  # (B, T, H_kv, D)
        self.v[layer][slots, :, batch.positions] = v.transpose(1, 2)

    def attend(self, layer: int, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        m: _Meta = batch.meta
        spec = self.layer_specs[layer]
        k = self.k[layer][m.slot_index, :, : m.kv_len]  # (B, H_kv, L, D)
        v = self.v[layer][m.slot_index, :, : m.kv_len]
        if m.uniform_start:  # one shared start: causal without a mask (flash on CUDA)
            return chunk_attention(q, k, v, batch.start[0], spec)
        if spec.window not in m.masks:
            m.masks[spec.window] = attention_mask(m.start, batch.num_new, m.kv_len, spec.window)
        return grouped_sdpa(q, k, v, m.masks[spec.window], spec.scale, spec.softcap)

    def commit(self, batch: ForwardBatch) -> None:
        self.seqs.commit(batch.seq_ids, batch.num_new)

    def export_kv(self, seq_id: int, layer: int, start: int, stop: int):
        self.seqs.check_range(seq_id, start, stop)
        slot = self.seqs.slot(seq_id)
        return self.k[layer][slot, :, start:stop].clone(), self.v[layer][slot, :, start:stop].clone()


class _Meta:
    """Private plan state; ``masks`` fills lazily per window on first use (inside a CUDA
    graph capture when the plan is static)."""

    __slots__ = ("slot_index", "start", "kv_len", "masks", "uniform_start")

    def __init__(self, slot_index, start, kv_len, uniform_start):
        self.slot_index, self.start, self.kv_len, self.masks = slot_index, start, kv_len, {}
        self.uniform_start = uniform_start


def _as_index(slot_index, device) -> torch.Tensor:
    if isinstance(slot_index, slice):
        return torch.arange(slot_index.start, slot_index.stop, device=device)
    return slot_index
