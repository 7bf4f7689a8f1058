"""KV caches: the ``KVCache`` contract every attention layer talks to, the sequence slots the
caches share, and the caches that keep all KV on one device.

* ``base``: ``KVCache`` (plan / append / attend / commit, and the optional capabilities with
  their defaults), ``ForwardBatch``, ``LayerSpec``;
* ``slots``: ``SequenceSlots``, sequence -> slot and committed length;
* ``paged``: ``PagedKVCache``, the plain cache ``LLM`` uses: exact attention over fixed-size
  pages of one pool per layer, split-KV decode (``paged_decode``); ``pages``: ``PageAllocator``,
  its page bookkeeping;
* ``contiguous``: ``ContiguousKVCache``, exact attention over one tensor per layer (the
  reference the other caches are compared with) and ``chunk_attention``, the dense attention
  of a prefill chunk; ``split_prefill``: its split-KV path (a short chunk over a long prefix);
* ``sparse``: ``SparseKVCache`` and ``SparseConfig``, KV as GPU-resident groups, decode over
  sinks + top groups + window (``kvdrive.retrieval``);
* ``streaming``: ``HostStreamingKVCache``, all KV in pinned host memory streamed to the GPU
  a layer ahead (the FlexGen-style baseline).
"""

from kvdrive.cache.base import ForwardBatch, KVCache, LayerSpec
from kvdrive.cache.contiguous import ContiguousKVCache
from kvdrive.cache.paged import PagedKVCache
from kvdrive.cache.slots import SequenceSlots
from kvdrive.cache.sparse import SparseConfig, SparseKVCache
from kvdrive.cache.streaming import HostStreamingKVCache

__all__ = [
    "ContiguousKVCache",
    "ForwardBatch",
    "HostStreamingKVCache",
    "KVCache",
    "LayerSpec",
    "PagedKVCache",
    "SequenceSlots",
    "SparseConfig",
    "SparseKVCache",
]
