"""The decoder-only transformer that runs every supported architecture.

Llama 3.x, SmolLM2, Mistral, Qwen2/2.5, Qwen3 and Gemma 3 differ only in details
that ``ModelConfig`` names (q/k norm, bias, sandwich norms, norm offset, embedding
scale, per-layer RoPE and sliding window), so one module tree serves them all.
Parameter names follow Hugging Face's, so a safetensors checkpoint loads without
renaming. Attention reads and writes KV only through the ``KVCache`` passed in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvdrive.cache.base import ForwardBatch, KVCache
from kvdrive.config import ModelConfig, RopeSpec
from kvdrive.models import rope
from kvdrive.models.layers import GatedMLP, RMSNorm, fuse_linears
from kvdrive.retrieval.predict import predict_query


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.norm_offset)
        else:
            self.q_norm = self.k_norm = None
        self.fused = False  # fuse_qkv: one GEMM (buffers qkv_weight, qkv_bias)

    def fuse_qkv(self) -> None:
        """One (q+k+v, hidden) weight for the three projections; q/k/v_proj's parameters become
        views of it (no extra memory; state dicts keep Hugging Face's names).

        NOTE: at decode's few rows the projections read their weights at HBM speed and each is a
        launch on the layer's serial chain; one GEMM reads the same bytes in one launch.
        """
        weight, bias = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        # buffers, so ``.to()`` moves them with the parameters (not persistent: not in state dicts)
        self.register_buffer("qkv_weight", weight, persistent=False)
        self.register_buffer("qkv_bias", bias, persistent=False)
        self.fused = True

    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, T, hidden) -> post-RoPE queries (B, H_q, T, D). Also used for next-layer prediction."""
        return self._rope_q(self.q_proj(x), cos, sin)

    def _rope_q(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = q.shape
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return rope.apply(q, cos, sin)

    def forward(self, x, cos, sin, cache: KVCache, batch: ForwardBatch) -> torch.Tensor:
        b, t, _ = x.shape
        if self.fused:
            qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
            q, k, v = qkv.split(
                [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], dim=-1
            )
            q = self._rope_q(q, cos, sin)
        else:
            q, k, v = self.project_q(x, cos, sin), self.k_proj(x), self.v_proj(x)  # q: (B, H_q, T, D)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if self.k_norm is not None:
            k = self.k_norm(k)
        k = rope.apply(k, cos, sin)
        cache.append(self.layer, k, v, batch)
        out = cache.attend(self.layer, q, batch)  # (B, H_q, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        eps, off = cfg.rms_norm_eps, cfg.norm_offset
        self.self_attn = Attention(cfg, layer)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)

    def forward(self, x, cos, sin, cache: KVCache, batch: ForwardBatch) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, cache, batch)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderBody(nn.Module):
    """Named ``model`` inside ``DecoderLM`` to match HF parameter names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderBody(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._freqs: dict[RopeSpec, torch.Tensor] = {}

    def fuse_projections(self) -> DecoderLM:
        """Fuse every layer's q/k/v projections into one GEMM (``Attention.fuse_qkv``), and its
        MLP's gate and up (``GatedMLP.fuse``)."""
        for block in self.model.layers:
            block.self_attn.fuse_qkv()
            block.mlp.fuse()
        return self

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def _rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[RopeSpec, tuple]:
        tables = {}
        for spec in set(self.config.rope):
            if spec not in self._freqs:
                self._freqs[spec] = rope.inv_freq(spec, self.config.head_dim, positions.device)
            tables[spec] = rope.cos_sin(self._freqs[spec], positions, dtype)
        return tables

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self.config.scale_embeddings:
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.model.norm(hidden)
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        out = hidden @ w.T
        if self.config.final_logit_softcap is not None:
            cap = self.config.final_logit_softcap
            out = torch.tanh(out / cap) * cap
        return out

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache, batch: ForwardBatch, all_logits: bool = False):
        """input_ids (B, T) -> logits (B, T, V) if ``all_logits`` else (B, V) of the last token.

        The caller plans ``batch`` on ``cache`` and commits it afterwards.
        """
        *_, logits = self.layer_steps(input_ids, cache, batch, all_logits)  # None per layer, then the logits
        return logits

    @torch.inference_mode()
    def layer_steps(self, input_ids: torch.Tensor, cache: KVCache, batch: ForwardBatch, all_logits: bool = False):
        """``forward`` one layer per ``next()``: yields None after issuing each layer, then the
        logits. Micro-batches interleave their layers this way (``engine.micro_batch``), so the
        GPU sees part 0's layer l, part 1's layer l, part 0's layer l+1, ... in that order."""
        x = self.embed(input_ids)  # (B, T, hidden)
        tables = self._rope_tables(batch.positions, x.dtype)
        # A cache that prefetches (``hint_layers``) gets layer l+1's query predicted from layer
        # l's input before layer l runs, so its fetch overlaps layer l's compute (InfiniGen).
        hinted = cache.hint_layers if input_ids.shape[1] == 1 else ()
        layers = self.model.layers
        for layer, block in enumerate(layers):
            cos, sin = tables[self.config.rope[layer]]
            if layer + 1 in hinted:
                nxt = layers[layer + 1]
                cos1, sin1 = tables[self.config.rope[layer + 1]]
                cache.hint(
                    layer + 1, predict_query(x[:, -1], nxt.input_layernorm, nxt.self_attn.project_q, cos1, sin1), batch
                )
            x = block(x, cos, sin, cache, batch)
            yield None
        if not all_logits:
            x = x[:, -1]
        yield self.logits(x).float()
