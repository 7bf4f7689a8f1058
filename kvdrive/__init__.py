"""kvdrive: long-context LLM inference with the KV cache tiered over GPU, host DRAM and SSD.

    from kvdrive import LLM, SamplingParams, TieredConfig, SparseConfig, PoolPath, PrefixConfig, RemoteConfig

Import is cheap and does no device work; heavy modules load on first use.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_EXPORTS = {
    "LLM": "kvdrive.engine.llm",
    "SamplingParams": "kvdrive.engine.sampling",
    "SparseConfig": "kvdrive.cache.sparse",
    "TieredConfig": "kvdrive.tiered.config",
    "PrefixConfig": "kvdrive.prefix.config",
    "RemoteConfig": "kvdrive.prefix.config",
    "PoolPath": "kvdrive.storage.pool",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvdrive' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
