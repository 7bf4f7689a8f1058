"""kvdrive: long-context LLM inference with the KV cache tiered over GPU, host DRAM and SSD.

Import is cheap and does no device work; heavy modules load on first use.
"""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name):
    if name == "LLM":
        from kvdrive.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from kvdrive.engine.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'kvdrive' has no attribute {name!r}")
