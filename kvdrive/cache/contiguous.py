"""The plain cache: every token of every layer in one preallocated tensor per layer.

Memory: ``max_seqs x max_len`` tokens for every layer, allocated once at
construction (no allocation per step). Attention is exact (torch SDPA) over the
cached prefix with a causal, optionally sliding-window, mask. This is the
reference every other cache is measured against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvdrive.cache.base import ForwardBatch, KVCache, LayerSpec, TierBytes
from kvdrive.cache.slots import SequenceSlots
from kvdrive.config import ModelConfig


def layer_specs(config: ModelConfig) -> tuple[LayerSpec, ...]:
    return tuple(
        LayerSpec(window=w, scale=config.attn_scale, softcap=config.attn_logit_softcap)
        for w in config.sliding_windows
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


def sdpa(q, k, v, mask, scale: float, softcap: float | None, is_causal: bool = False) -> torch.Tensor:
    """Exact attention; q (B, H_q, T, D), k/v (B, H_kv, L, D). GQA by head grouping."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
        )
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    logits = torch.tanh(logits / softcap) * softcap
    if is_causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril(k.shape[-2] - q.shape[-2])
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.matmul(logits.softmax(-1), v.float()).to(q.dtype)


def grouped_sdpa(q, k, v, mask, scale: float, softcap: float | None) -> torch.Tensor:
    """Masked GQA attention without copying K/V: the query heads that share a KV head
    become extra query rows. q (B, H_q, T, D), k/v (B, H_kv, L, D), mask (B, 1, T, L)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    rep = hq // hkv
    if rep == 1 or softcap is not None:
        return sdpa(q, k, v, mask, scale, softcap)
    qg = q.reshape(b, hkv, rep * t, d)  # rows ordered (rep, T)
    mg = mask[:, :, None].expand(b, 1, rep, t, mask.shape[-1]).reshape(b, 1, rep * t, mask.shape[-1])
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mg, scale=scale)
    return out.reshape(b, hq, t, d)


class ContiguousKVCache(KVCache):
    supports_cuda_graphs = True  # plan(start=...) gives fixed shapes for replay

    def __init__(self, config: ModelConfig, max_seqs: int, max_len: int, device: torch.device, dtype: torch.dtype):
        self.layer_specs = layer_specs(config)
        self.max_seqs, self.max_len = max_seqs, max_len
        self.device, self.dtype = device, dtype
        shape = (max_seqs, config.num_key_value_heads, max_len, config.head_dim)  # (S, H_kv, L, D)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.seqs = SequenceSlots(max_seqs, max_len)
        self._slot_tensors: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def tier_bytes(self) -> dict[str, TierBytes]:
        """The device's KV: committed tokens of every sequence against the whole allocation."""
        per_token = self.nbytes // (self.max_seqs * self.max_len)
        return {"gpu": TierBytes(self.seqs.tokens() * per_token, self.nbytes)}

    def add(self, seq_id: int, max_tokens: int) -> None:
        self.seqs.add(seq_id, max_tokens)

    def free(self, seq_id: int) -> None:
        self.seqs.free(seq_id)

    def length(self, seq_id: int) -> int:
        return self.seqs.length(seq_id)

    def plan(self, seq_ids, num_new: int, start: torch.Tensor | None = None) -> ForwardBatch:
        """``start``: a device tensor (B,) of cached lengths to plan against instead of the
        host's record. CUDA-graph decode passes its static buffer here: every tensor the
        forward then uses is derived on the GPU from it, and attention spans the whole
        allocation (``max_len``) under a mask, so shapes stay fixed across replays."""
        seq_ids = tuple(seq_ids)
        starts = self.seqs.starts(seq_ids, num_new)
        slots = [self.seqs.slot(s) for s in seq_ids]
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        static = start is not None
        start_t = start if static else torch.tensor(starts, device=self.device)
        meta = _Meta(
            slot_index=slice(slots[0], slots[0] + len(slots)) if contiguous else self._slot_tensor(slots),
            start=start_t,
            kv_len=self.max_len if static else max(starts) + num_new,
            # One prompt from position 0 is plain causal attention: SDPA's fastest kernel, no mask.
            causal=not static and len(seq_ids) == 1 and starts[0] == 0,
            uniform_start=not static and len(set(starts)) == 1,
        )
        positions = start_t[:, None] + torch.arange(num_new, device=self.device)  # (B, T)
        return ForwardBatch(seq_ids=seq_ids, start=starts, num_new=num_new, positions=positions, meta=meta)

    def _slot_tensor(self, slots: list[int]) -> torch.Tensor:
        """Device tensor of a slot list, memoised: a CUDA-graph capture may not copy from the
        host, and its warm-up runs (outside capture) create the tensor first."""
        key = tuple(slots)
        if key not in self._slot_tensors:
            self._slot_tensors[key] = torch.tensor(slots, device=self.device)
        return self._slot_tensors[key]

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
        full_view = spec.window is None or m.kv_len <= spec.window
        if m.causal and (spec.window is None or batch.num_new <= spec.window):
            return sdpa(q, k, v, None, spec.scale, spec.softcap, is_causal=True)
        if m.uniform_start and batch.num_new == 1 and full_view:
            return sdpa(q, k, v, None, spec.scale, spec.softcap)  # every cached key is visible
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

    __slots__ = ("slot_index", "start", "kv_len", "masks", "causal", "uniform_start")

    def __init__(self, slot_index, start, kv_len, causal, uniform_start):
        self.slot_index, self.start, self.kv_len, self.masks = slot_index, start, kv_len, {}
        self.causal, self.uniform_start = causal, uniform_start


def _as_index(slot_index, device) -> torch.Tensor:
    if isinstance(slot_index, slice):
        return torch.arange(slot_index.start, slot_index.stop, device=device)
    return slot_index
