"""The KV-cache interface every attention layer talks to.

A model never owns its KV. Each forward pass goes through a ``KVCache`` object
passed in explicitly, in three phases:

1. ``plan(seq_ids, num_new)`` once per forward: host-side work (positions, masks,
   selection, prefetch issue). Returns a ``ForwardBatch``, valid until ``commit``.
2. per layer, ``append(layer, k, v, batch)`` then ``attend(layer, q, batch)``: no
   host synchronisation; the cache decides which KV the query sees (all of it for
   the contiguous cache, sinks + selected groups + window for the tiered cache).
3. ``commit(batch)`` once all layers ran: the new tokens become part of each
   sequence's length.

Sequences in one batch may have different cached lengths; all of them add the
same number ``T`` of new tokens in one pass (the engine prefills one sequence at a
time and decodes the batch with ``T = 1``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from kvdrive.cache.slots import SequenceSlots


@dataclass(frozen=True)
class LayerSpec:
    """What attention of one layer needs from the cache."""

    window: int | None  # sliding window in tokens (key allowed iff q_pos - k_pos < window); None = global
    scale: float  # softmax scale applied to q.k
    softcap: float | None = None  # tanh logit soft-capping (Gemma 2 style); None = off


@dataclass(frozen=True)
class ForwardBatch:
    """The plan of one forward pass.

    ``positions`` (B, T) are the absolute positions of the new tokens, used for RoPE.
    ``meta`` is private to the cache that built it.
    """

    seq_ids: tuple[int, ...]
    start: tuple[int, ...]  # cached tokens per sequence before this pass
    num_new: int  # T
    positions: torch.Tensor  # (B, T) int64 on the cache's device
    meta: Any = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_ids)


class TierBytes(NamedTuple):
    """Bytes of one tier: ``used`` by the registered sequences, ``capacity`` allocated or budgeted."""

    used: int
    capacity: int


class KVCache(ABC):
    """Holds the KV of many sequences for all layers of one model.

    Contract: ``add`` registers a sequence and reserves room for ``max_tokens``
    tokens (raises ``CapacityError`` if it cannot); ``free`` releases it. Tensors
    passed to ``append`` are post-RoPE, shape (B, H_kv, T, D), in the cache dtype.
    ``attend`` returns (B, H_q, T, D). A ``ForwardBatch`` must be used with the
    cache that planned it, and only until its ``commit``.

    Optional capabilities are declared here with their defaults (a plain cache has none of
    them); the engine reads these attributes and calls these methods, never probes for them.
    """

    layer_specs: tuple[LayerSpec, ...]
    max_seqs: int  # sequences held at once: the engine's default batch
    max_len: int  # tokens one sequence may hold
    device: torch.device  # where attention runs and imported KV goes
    seqs: SequenceSlots  # the registered sequences (``seq_id in cache.seqs``) and their lengths

    # CUDA-graph decode: ``plan(seq_ids, 1, start=...)`` plans against a device tensor of
    # lengths with fixed shapes, and nothing a decode step does needs the host.
    supports_cuda_graphs: bool = False
    graph_epoch: int = 0  # bumped when buffers a captured graph reads are reallocated: capture again
    # ``plan(seq_ids, 1, start=..., span=n)`` attends to the first n positions only: a graph captured
    # while every length is below n costs what those keys cost, not the whole ``max_len`` allocation.
    supports_graph_span: bool = False
    # ``plan_padded(slots, start)``: a decode step over sequence slots named by a device tensor,
    # ``pad_slot`` filling the batch up to a graph's size; one graph per padded size then serves
    # every batch of sequences up to it (``kvdrive.engine.cuda_graph.PaddedDecodeGraphs``).
    supports_padded_graphs: bool = False
    # Micro-batched decode (``kvdrive.engine.micro_batch``): per-step state is per sequence,
    # counters add atomically, and ``plan(..., new_step=False)`` plans a later part of one step.
    supports_micro_batches: bool = False
    micro_batches: int = 1  # parts a decode step is split into
    # Layers whose query the model predicts one layer early and passes to ``hint``.
    hint_layers: frozenset[int] = frozenset()
    # A per-phase profile of eager decode steps may be set on ``profile`` (a ``StepProfile``).
    supports_profile: bool = False
    profile: Any = None

    @abstractmethod
    def add(self, seq_id: int, max_tokens: int, prompt_tokens: int | None = None) -> None:
        """Register ``seq_id``, which may hold ``max_tokens`` tokens; ``prompt_tokens`` of them
        will be prefilled (None: up to ``max_tokens``), which a cache may size prefill state by."""

    def can_add(self, max_tokens: int) -> bool:
        """Whether ``add`` of a sequence of ``max_tokens`` tokens would succeed now: the engine
        admits a request only then. Default: a sequence slot is free (a cache that holds
        ``max_len`` tokens for every slot); a paged cache also counts its free pages."""
        return self.seqs.num_free > 0

    @property
    def token_capacity(self) -> int:
        """Tokens the cache holds, all sequences together. Default: every slot full."""
        return self.max_seqs * self.max_len

    @abstractmethod
    def free(self, seq_id: int) -> None: ...

    @abstractmethod
    def length(self, seq_id: int) -> int:
        """Tokens committed for ``seq_id``."""

    @abstractmethod
    def plan(self, seq_ids: list[int] | tuple[int, ...], num_new: int) -> ForwardBatch: ...

    @abstractmethod
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> None: ...

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor: ...

    @abstractmethod
    def commit(self, batch: ForwardBatch) -> None: ...

    def place(self, seq_ids) -> None:
        """After a prompt's last prefill chunk: initial placement of its KV across the cache's
        tiers by the prompt's own attention. Default: nothing to place."""

    def hint(self, layer: int, q_pred: torch.Tensor, batch: ForwardBatch) -> None:
        """A predicted query (B, H_q, D) of ``layer`` (one of ``hint_layers``), issued before the
        layer before it runs, so the cache may fetch ahead. Default: ignored."""

    def prepare_replay(self, seq_ids) -> None:
        """Host-side work of a graphed decode step of ``seq_ids``, before its replay (may bump
        ``graph_epoch``). Default: none."""

    def stats(self) -> dict:
        """Counters since ``reset_stats`` (traffic, hits); empty for a cache that keeps none."""
        return {}

    def reset_stats(self) -> None:
        """Start the counters of ``stats`` over."""

    def tier_bytes(self) -> dict[str, TierBytes]:
        """Bytes used and held per tier (``gpu``: the device's memory, ``host``, ``disk``), read
        between steps without a device sync. Default: nothing reported."""
        return {}

    def export_kv(self, seq_id: int, layer: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of tokens [start, stop) of a committed sequence, each (H_kv, stop - start, D),
        post-RoPE, as new tensors (for the prefix pool). Importing goes through the normal
        path: ``plan(seq, T)``, ``append`` per layer, ``commit``."""
        raise NotImplementedError(f"{type(self).__name__} cannot export KV")

    def close(self) -> None:
        """Release what a cache holds outside Python objects (files, I/O threads); the cache is
        unusable after. Default: nothing to release."""
