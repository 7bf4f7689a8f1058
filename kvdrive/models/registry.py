"""Architecture registry: a Hugging Face config -> ``ModelConfig``.

Dispatch is on the config's ``model_type`` (what ``config.json`` or the GGUF
metadata declares), never on file names. Every supported architecture runs on
``kvdrive.models.decoder.DecoderLM``; the adapter states how it differs.
"""

from __future__ import annotations

from collections.abc import Callable

from kvdrive.config import ModelConfig, RopeSpec
from kvdrive.errors import KvdriveError


def _rope_spec(params: dict) -> RopeSpec:
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    return RopeSpec(
        theta=float(params["rope_theta"]),
        rope_type=kind,
        factor=float(params.get("factor", 1.0) or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192) or 8192),
    )


def _layer_types(hf, n: int) -> list[str]:
    types = getattr(hf, "layer_types", None)
    return list(types) if types else ["full_attention"] * n


def _ropes(hf, types: list[str]) -> tuple[RopeSpec, ...]:
    params = hf.rope_parameters
    if params and all(isinstance(v, dict) for v in params.values()):  # keyed by layer type
        return tuple(_rope_spec(params[t]) for t in types)
    return tuple(_rope_spec(params) for _ in types)


def _eos(hf) -> tuple[int, ...]:
    eos = getattr(hf, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)


def _common(hf, architecture: str) -> dict:
    n = hf.num_hidden_layers
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    types = _layer_types(hf, n)
    return dict(
        architecture=architecture,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=head_dim,
        max_position_embeddings=hf.max_position_embeddings,
        rms_norm_eps=hf.rms_norm_eps,
        rope=_ropes(hf, types),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_ids=_eos(hf),
        name=getattr(hf, "name_or_path", "") or "",
    ), types


def llama_family(hf) -> ModelConfig:
    """Llama 3.x, SmolLM2, Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k RMSNorm)."""
    kw, types = _common(hf, hf.model_type)
    window = getattr(hf, "sliding_window", None)
    if hf.model_type in ("qwen2", "qwen3") and not getattr(hf, "use_sliding_window", False):
        window = None
    windows = tuple(window if (t == "sliding_attention" or hf.model_type == "mistral") else None for t in types)
    return ModelConfig(
        **kw,
        sliding_windows=windows,
        attn_scale=kw["head_dim"] ** -0.5,
        hidden_act=hf.hidden_act,
        attention_bias=bool(getattr(hf, "attention_bias", hf.model_type == "qwen2")),
        qk_norm=hf.model_type == "qwen3",
    )


def gemma3(hf) -> ModelConfig:
    """Gemma 3 text: sliding local layers + global layers, (1 + w) norms, sandwich norms, q/k norm."""
    hf = getattr(hf, "text_config", None) or hf
    kw, types = _common(hf, "gemma3_text")
    windows = tuple(hf.sliding_window if t == "sliding_attention" else None for t in types)
    return ModelConfig(
        **kw,
        sliding_windows=windows,
        attn_scale=hf.query_pre_attn_scalar**-0.5,
        hidden_act=hf.hidden_activation,
        attention_bias=bool(hf.attention_bias),
        qk_norm=True,
        norm_offset=1.0,
        scale_embeddings=True,
        sandwich_norms=True,
        attn_logit_softcap=hf.attn_logit_softcapping,
        final_logit_softcap=hf.final_logit_softcapping,
    )


ARCHITECTURES: dict[str, Callable] = {
    "llama": llama_family,
    "mistral": llama_family,
    "qwen2": llama_family,
    "qwen3": llama_family,
    "gemma3_text": gemma3,
    "gemma3": gemma3,
}


def from_hf_config(hf) -> ModelConfig:
    adapter = ARCHITECTURES.get(hf.model_type)
    if adapter is None:
        raise KvdriveError(
            f"architecture {hf.model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return adapter(hf)
