"""The workloads of ``kvdrive bench faults`` that its crash trials share: the prompts, a row of
counts, the fault environment of a block, the tiered cache's configuration and run."""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

from kvdrive.storage import faults as fault_layer

_SHARED = "Anne Elliot walked along the Cobb at Lyme while the grey sea rose against the old stones. "
PREFIX_PROMPTS = [_SHARED * 2 + q for q in ("Who was with her?", "What did she see?", "Why had she come?")]
TIERED_PROMPTS = [f"Chapter {i}. " + _SHARED * 5 for i in range(2)]
POOL_FILES = ("kvdrive-prefix-", "kvdrive-prefix.sqlite", "kvdrive-prefix.lock")


@dataclass
class Row:
    workload: str
    fault: str
    trials: int = 0
    fired: int = 0
    identical: int = 0
    recovered_reads: int = 0
    recomputed_chunks: int = 0
    skipped_stores: int = 0
    surfaced: int = 0
    degraded: int = 0
    wrong: int = 0
    leaked_bytes: int = 0
    errors: tuple = ()  # distinct surfaced messages (first 120 characters)


@contextlib.contextmanager
def injected(text: str | None):
    """``KVDRIVE_FAULTS=text`` for the block (unset with None); warnings of the run kept quiet."""
    old = os.environ.pop(fault_layer.ENV, None)
    if text:
        os.environ[fault_layer.ENV] = text
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        os.environ.pop(fault_layer.ENV, None)
        if old is not None:
            os.environ[fault_layer.ENV] = old


def greedy(max_tokens: int):
    from kvdrive.engine.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def tiered_config(path: str, defer: bool):
    from kvdrive.cache.sparse import SparseConfig
    from kvdrive.storage.pool import PoolPath
    from kvdrive.tiered.cache import TieredConfig

    arena = 64 if defer else 12  # groups a layer: all of both sequences, or fewer (reads back from disk)
    return TieredConfig(
        SparseConfig(budget=64, sink_tokens=16, window_tokens=32),
        cache_tokens=96,
        disk=(PoolPath(path, 64 << 20),),
        host_bytes=30 * arena * 24576,
        direct="off",
        disk_misses="defer" if defer else "wait",
    )


def tiered_outputs(loaded, path: str, defer: bool):
    """The tiered workload's outputs (token ids per prompt), its lost groups and the slot reads
    its retries recovered."""
    from kvdrive.engine.llm import LLM

    with LLM(loaded=loaded, kv_cache=tiered_config(path, defer), max_batch=2) as llm:
        outs = [o.token_ids for o in llm.generate(TIERED_PROMPTS, greedy(6))]
        host = llm.cache.host
        devices = host.pool.devices
        return outs, host.stats()["lost"], recovered(devices)


def recovered(devices) -> int:
    """Slot reads of ``devices`` that failed once and succeeded on their retry."""
    return sum(d.read_retries - d.read_failures for d in devices)
