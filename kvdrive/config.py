"""Model configuration: one frozen, validated description of a decoder.

``ModelConfig`` is built from a Hugging Face config (``config.json``, GGUF metadata
via transformers, or a named preset) by the architecture's adapter in
``kvdrive.models.registry``. Everything downstream (runner, KV layout, benchmarks)
reads only this object, never the HF config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvdrive.errors import KvdriveError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    raise KvdriveError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of one layer: ``rope_type`` in default | linear | llama3."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("default", "linear", "llama3"):
            raise KvdriveError(f"rope type {self.rope_type!r} is not supported; supported: default, linear, llama3")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # registry key, e.g. "llama", "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: tuple[RopeSpec, ...]  # one per layer
    sliding_windows: tuple[int | None, ...]  # one per layer; None = global attention
    attn_scale: float
    hidden_act: str = "silu"
    attention_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    # Gemma specifics: RMSNorm weight is (1 + w), embeddings scaled by sqrt(hidden),
    # norms before and after both attention and MLP ("sandwich").
    norm_offset: float = 0.0
    scale_embeddings: bool = False
    sandwich_norms: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise KvdriveError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        n = self.num_hidden_layers
        if len(self.rope) != n or len(self.sliding_windows) != n:
            raise KvdriveError(f"rope and sliding_windows need one entry per layer ({n})")
        if self.hidden_act not in ("silu", "gelu_pytorch_tanh", "gelu"):
            raise KvdriveError(f"activation {self.hidden_act!r} is not supported; supported: silu, gelu_pytorch_tanh")

    @property
    def queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def global_layers(self) -> tuple[int, ...]:
        """Layers whose KV grows with the context (no sliding window)."""
        return tuple(i for i, w in enumerate(self.sliding_windows) if w is None)

    def kv_bytes_per_token_per_layer(self, dtype: torch.dtype) -> int:
        return 2 * self.num_key_value_heads * self.head_dim * dtype.itemsize

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """K and V of one token over all layers, as a full cache stores it."""
        return self.num_hidden_layers * self.kv_bytes_per_token_per_layer(dtype)

    def kv_bytes_at(self, context: int, dtype: torch.dtype) -> int:
        """KV bytes one sequence of ``context`` tokens really needs: sliding layers keep their window."""
        per_layer = self.kv_bytes_per_token_per_layer(dtype)
        return sum(per_layer * (context if w is None else min(w, context)) for w in self.sliding_windows)

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        norms = (4 if self.sandwich_norms else 2) * h + (2 * self.head_dim if self.qk_norm else 0)
        per_layer = attn + 3 * h * i + norms
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * per_layer + h
