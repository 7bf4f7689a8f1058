"""Write a Hugging Face directory with random weights of a preset's shape and a real tokenizer.

Both servers of ``kvdrive bench serve --transformers DIR --model DIR`` then load the same
weights and tokenize the same text: a side-by-side of kvdrive and ``transformers serve`` at a
large shape (Llama-3.1-8B) where no checkpoint can be fetched. The vocabulary is the
tokenizer's (its embedding and head rows differ from the real model's; every other tensor
has the real shape). Random weights: the numbers measured with it are speed only.

    python bench/scripts/random_hf_dir.py llama-3.1-8b TOKENIZER OUT_DIR [--layers N]

TOKENIZER: a directory holding a tokenizer, or a model kvdrive loads from a GGUF (``smollm2``,
``gemma3``, a .gguf file), whose converted directory lends its tokenizer.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kvdrive.models import presets


def tokenizer_dir(spec: str) -> str:
    """A directory with the tokenizer of ``spec``: itself, or the Hugging Face directory kvdrive
    converts a GGUF model into (converted here on first use)."""
    from kvdrive.bench.serving.servers import hf_dir_of
    from kvdrive.models import embedded

    if spec in embedded.EMBEDDED or spec.endswith(".gguf"):
        from kvdrive.models.loader import load_model

        load_model(spec, device="cpu")  # writes the converted directory once
    return hf_dir_of(spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset", choices=sorted(presets.PRESETS))
    p.add_argument(
        "tokenizer",
        help="a directory holding a tokenizer (tokenizer.json, tokenizer_config.json), or smollm2, gemma3 or a .gguf",
    )
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, help="fewer layers than the preset (a quick check on a CPU)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    args.tokenizer = tokenizer_dir(args.tokenizer)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    fields = dict(presets.PRESETS[args.preset])
    fields.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    fields.pop("pad_token_id", None)
    if args.layers:
        fields["num_hidden_layers"] = args.layers
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, max_shard_size="4GB")
    tok.save_pretrained(args.out)
    template = Path(args.tokenizer) / "chat_template.jinja"
    if template.exists():
        shutil.copy(template, args.out / template.name)
    n = sum(t.numel() for t in model.parameters())
    print(
        f"{args.out}: {args.preset} shape, {config.num_hidden_layers} layers, vocab {len(tok)}, {n / 1e9:.2f}B params"
    )


if __name__ == "__main__":
    main()
