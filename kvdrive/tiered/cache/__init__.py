"""The tiered sparse cache: full KV in pinned host memory, a GPU selection cache per layer.

Where things live (one ``TieredSparseKVCache`` for all layers of one model):

* host (pinned): every group of every sequence, ``host[l]`` (S * N, 2, H_kv, G, D); each
  new token is written there as it is produced (a kernel writing through UVA);
* GPU: the key summaries of full groups (``SummaryTable``) and, per sparse layer, a
  ``SelectionCache`` of ``capacity[l]`` groups per sequence. Capacities start even and,
  after ``rebalance_after`` decode steps, follow each layer's measured misses (layers
  differ in how much their selection moves between steps).

A decode step on a sparse layer scores the summaries with the query, selects sinks +
window + top groups under the budget (shared by the layer's heads: one whole group per
read), makes the selection resident in the layer's cache (hits stay; misses evict by the
eviction key and are copied from host by one masked kernel driven by GPU indices: no
host sync), then attends over the cache's pages. With ``prefetch``, the model calls
``hint(l + 1, q_pred)`` while layer l computes: layer l+1's groups are predicted from
layer l's hidden state and fetched on a side stream; layer l+1 waits on that event and
then fetches only what the prediction missed. A prompt's prefill keeps its KV of every
layer on the GPU until it is done, where there is room (``TieredPrefill``), and each chunk
attends to it with no mask and no host traffic; without room, and for the decode of dense
layers, attention is exact over KV gathered from host for that layer alone;
sliding-window layers decode from a GPU ring of their last ``window`` tokens
(``WindowRing``), written as tokens arrive.

With ``kv_dtype`` fp8, int8 or int4 the host (and disk) tiers store every full group in that format
and each sequence's open group exact (``host_kv.OpenGroups``): token writes go to the open row;
a group that fills is sealed (quantized on the device into its row, summarized from its exact
keys, and the GPU cache's copy of it replaced by the stored group's round trip, so attention
sees what a fetch would deliver); fetches widen stored groups to the model dtype on the GPU.

The modules, by phase:

* ``kv_cache``: ``TieredSparseKVCache``, the ``KVCache``: construction, sequences, the step's
  plan and commit, the data path (append, attend, hint) and capacity rebalancing;
* ``step_meta``: what every layer of one forward shares (``ForwardBatch.meta``);
* ``group_summaries``: ``GroupSummaries``, the summary tables kept in step with the host tier;
* ``select_fetch``: ``SelectFetch``, a sparse layer's selection made resident (score, select,
  disk misses, fetch), and the deferred path's selections sent to the host;
* ``sparse_decode``: ``SparseDecode``, a sparse layer's prefetch and attention, on the side
  and control streams it keeps for each compute stream;
* ``placement``: ``Placement``, the warm start once a prompt is prefilled;
* ``sealing``: ``seal``, a compressed tier's groups that filled;
* ``stats``: ``report``, what ``TieredSparseKVCache.stats`` returns.
"""

from kvdrive.tiered.cache.kv_cache import TieredSparseKVCache
from kvdrive.tiered.config import TieredConfig
from kvdrive.tiered.step_profile import StepProfile

__all__ = ["StepProfile", "TieredConfig", "TieredSparseKVCache"]
