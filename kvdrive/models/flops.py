"""FLOPs of running prompt tokens through a model: what ``kvdrive bench prefill`` divides by its
time, and what the scheduler's step budget counts a prefill chunk as; and the GPU bytes a
prefill forward allocates besides the KV (``prefill_activation_bytes``: the caches leave room
for it when they size themselves).

Tokens ``p .. p+n-1`` of a prompt cost, per layer, ``2 x`` the parameters of its q, k, v, o
and MLP matrices each (linear), plus ``4 x H_q x D`` per query-key pair attended: a token at
position ``i`` attends ``i + 1`` keys on a global layer and ``min(i + 1, W)`` on a window-W
layer. The LM head (last token only), norms, RoPE and softmax are not counted.
"""

from __future__ import annotations

from kvdrive.config import ModelConfig


def linear_flops_per_token(cfg: ModelConfig) -> int:
    """FLOPs of one token through every layer's q, k, v, o and MLP matrices."""
    h, d, hq, hkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    per_layer = h * hq * d + 2 * h * hkv * d + hq * d * h + 3 * h * cfg.intermediate_size
    return 2 * per_layer * cfg.num_hidden_layers


def _pairs_before(length: int, window: int | None) -> int:
    """Query-key pairs of positions 0 .. length-1 on one layer."""
    if window is None or window >= length:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window  # positions < W see p + 1 keys, the rest W


def attention_pairs(cfg: ModelConfig, begin: int, end: int) -> int:
    """Query-key pairs attended by positions ``begin .. end-1``, summed over layers."""
    return sum(_pairs_before(end, w) - _pairs_before(begin, w) for w in cfg.sliding_windows)


def prefill_flops(cfg: ModelConfig, length: int) -> dict:
    """FLOPs of prefilling ``length`` tokens from position 0: linear layers and causal attention."""
    linear = length * linear_flops_per_token(cfg)
    attention = 4 * cfg.num_attention_heads * cfg.head_dim * attention_pairs(cfg, 0, length)
    return {"linear": linear, "attention": attention, "total": linear + attention}


class ChunkCost:
    """A prefill chunk's work in tokens of a prompt's start: the FLOPs of positions
    ``prefix .. prefix+n-1`` over the linear FLOPs of one token. A chunk near position 0
    costs about its length; deep in a long prompt it also pays for attending to the whole
    prefix (Llama-3.2-1B: a token at position 130K costs ~9 tokens' worth)."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.per_pair = 4 * cfg.num_attention_heads * cfg.head_dim / linear_flops_per_token(cfg)

    def __call__(self, prefix: int, n: int) -> float:
        return n + self.per_pair * attention_pairs(self.cfg, prefix, prefix + n)

    def fit(self, prefix: int, most: int, budget: float) -> int:
        """The longest chunk of at most ``most`` tokens from ``prefix`` that costs <= ``budget``
        (0 when not even one token fits)."""
        lo, hi = 0, most
        while lo < hi:  # cost grows with n: bisect
            mid = (lo + hi + 1) // 2
            if self(prefix, mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo


def prefill_activation_bytes(config: ModelConfig, itemsize: int, tokens: int) -> int:
    """An upper estimate of what one prefill forward of ``tokens`` tokens allocates besides the
    KV: a layer's query, key and value, the fused gate and up output, the activation and a few
    hidden-sized buffers, per token (131 KB for Llama-3.1-8B in bf16; one chunk of 32K or 128K
    tokens peaked at about 120 KB a token above the weights and the KV on the H100)."""
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    return tokens * itemsize * (3 * config.intermediate_size + qkv + 4 * config.hidden_size)
