"""Load a GGUF file: metadata -> config via transformers, tensors dequantized by ``gguf``.

GGUF stores llama-architecture q/k projections permuted for llama.cpp's RoPE and
Gemma norm weights as ``1 + w``; both are undone here. The first load converts
the file into a cache directory (fp32 safetensors + config.json + tokenizer) so
later loads take seconds instead of re-parsing and dequantizing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from kvdrive.env import cache_dir
from kvdrive.errors import KvdriveError
from kvdrive.progress import progress

# HF model_type -> gguf architecture name, where they differ.
_GGUF_ARCH = {"gemma3_text": "gemma3"}


def converted_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{path.stem}-{key}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (rotary pairs interleaved -> halves)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def gguf_tensors(path: Path, hf_config, hf_names: list[str]) -> dict[str, torch.Tensor]:
    """Dequantize every tensor of ``path`` into float32, keyed by the HF parameter name."""
    import gguf

    arch_name = _GGUF_ARCH.get(hf_config.model_type, hf_config.model_type)
    arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name), None)
    if arch is None:
        raise KvdriveError(f"gguf does not know architecture {arch_name!r}")
    name_map = gguf.get_tensor_name_map(arch, hf_config.num_hidden_layers)
    to_hf = {}
    for hf_name in hf_names:
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = name_map.get_name(base)
        if gguf_name is not None:
            to_hf[f"{gguf_name}.{suffix}"] = hf_name
    reader = gguf.GGUFReader(str(path))
    out = {}
    n_heads, n_kv = hf_config.num_attention_heads, hf_config.num_key_value_heads
    for t in progress(reader.tensors, desc=f"dequantizing {path.name}", unit="tensor"):
        if t.name not in to_hf:
            continue
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if arch_name == "llama" and ".attn_q." in t.name:
            w = _unpermute(w, n_heads)
        elif arch_name == "llama" and ".attn_k." in t.name:
            w = _unpermute(w, n_kv)
        if arch_name.startswith("gemma") and t.name.endswith("norm.weight"):
            w = w - 1.0
        out[to_hf[t.name]] = torch.from_numpy(np.ascontiguousarray(w))
    missing = [n for n in hf_names if n not in out]
    if missing:
        raise KvdriveError(f"{path.name} lacks tensors {missing[:4]}...; is it a complete {arch_name} checkpoint?")
    return out


SAMPLE = "The quick brown fox jumps over the lazy dog, and then it runs into the forest."


MIN_CHARS_PER_TOKEN = 3.0  # English runs 4-5 characters a token in a real vocabulary; SAMPLE gives 4.3


def check_tokenizer(tok, path: Path) -> None:
    """Refuse a conversion that cuts English into pieces of a few characters: transformers 5.17
    does that to Gemma 3's GGUF (2.2 characters a token on SAMPLE against 4.3; prompts twice as
    long, no word a single token); 5.23 converts it right."""
    n = len(tok(SAMPLE, add_special_tokens=False)["input_ids"])
    if len(SAMPLE) < MIN_CHARS_PER_TOKEN * n:
        import transformers

        raise KvdriveError(
            f"transformers {transformers.__version__} converted the tokenizer of {path.name} into "
            f"{n} tokens for {len(SAMPLE)} characters of English (a broken conversion): upgrade "
            "transformers (pip install -U 'transformers>=5.23') and run again"
        )


def check_file(path: Path) -> None:
    """Refuse a file that does not start like a GGUF, with one line."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise KvdriveError(f"cannot read {path}: {err.strerror or err}") from None
    if magic != b"GGUF":
        raise KvdriveError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")


def _unreadable(path: Path, err: Exception) -> KvdriveError:
    """A GGUF that its parsers fail on (cut short, damaged) as a one-line error."""
    return KvdriveError(
        f"{path} is not a complete GGUF checkpoint that transformers can read "
        f"({type(err).__name__}: {err}); download or copy it again"
    )


def convert(path: Path, target: Path, build_model) -> None:
    """Write ``target``/{model.safetensors, config.json, tokenizer files} from the GGUF at ``path``.

    ``build_model(hf_config)`` returns a meta-device model whose parameter names we fill.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    check_file(path)
    folder, name = str(path.parent), path.name
    try:
        hf_config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as err:  # a cut or damaged file fails in the parser in many ways (struct, numpy, keys)
        raise _unreadable(path, err) from None
    names = list(build_model(hf_config).state_dict().keys())
    try:
        tensors = gguf_tensors(path, hf_config, names)
    except KvdriveError:
        raise
    except Exception as err:  # tensor data cut short
        raise _unreadable(path, err) from None
    tmp = target.with_name(target.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "model.safetensors"))
    hf_config.save_pretrained(tmp)
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as err:  # a GGUF without tokenizer metadata still runs on token ids
        (tmp / "NO_TOKENIZER").write_text(str(err))
    else:
        check_tokenizer(tok, path)
        tok.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({"gguf": str(path.resolve())}))
    tmp.rename(target)
