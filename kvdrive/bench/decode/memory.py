"""What each system of ``kvdrive bench decode`` holds and moves at one point of the sweep: bytes
beyond the weights in GPU memory, in host memory, on disk, and read by attention in one decode
step (the roofline's inputs). Estimates: each row records them beside what it measured.
"""

from __future__ import annotations

from kvdrive.bench.decode.points import GIB, Options, Shape
from kvdrive.cache.sparse import SparseConfig


def budget_tokens(sparse: SparseConfig, context: int) -> int:
    return int(sparse.budget if sparse.budget >= 1 else sparse.budget * context)


def summary_bytes(s: Shape, o: Options, tokens: int) -> int:
    """The summaries of ``tokens`` tokens of every sequence on every global layer, as scored."""
    from kvdrive.retrieval.summaries import make_summarizer

    c = s.config
    summ = make_summarizer(o.sparse.summary, c.num_key_value_heads, c.head_dim, o.sparse.group_tokens)
    return s.batch * -(-tokens // o.sparse.group_tokens) * len(c.global_layers) * summ.bytes_per_group(s.dtype)


def sparse_read(s: Shape, o: Options) -> int:
    """Budget tokens on global layers, the window on sliding layers, plus every summary scored."""
    per_layer = s.config.kv_bytes_per_token_per_layer(s.dtype)
    seen = sum(min(s.context, budget_tokens(o.sparse, s.context) if w is None else w) for w in s.config.sliding_windows)
    return s.batch * per_layer * seen + summary_bytes(s, o, s.context)


def full_read(s: Shape, o: Options) -> int:
    return s.all_kv


def layer_buffers(s: Shape, o: Options) -> int:
    return 2 * s.batch * s.context * s.config.kv_bytes_per_token_per_layer(s.dtype)  # double-buffered K and V


def full_cache_kv(s: Shape, o: Options) -> int:
    """Every token's KV on every layer in the model dtype, as a full cache stores it (sliding
    layers too; ``Shape.all_kv`` keeps only their window). Also the streaming system's host copy:
    pinned host memory is registered at its exact size, ``device.host_zeros``."""
    return s.batch * s.context * s.kv_token


def stored_share(s: Shape, o: Options) -> float:
    """Bytes of a group in the tiered systems' storage format over its bytes in the model dtype."""
    from kvdrive.storage.layout import GroupLayout

    layout = GroupLayout.from_config(s.config, s.dtype, o.sparse.group_tokens, o.kv_dtype)
    return layout.stored_bytes / layout.group_bytes


def stored_kv(s: Shape, o: Options) -> int:
    """Every token's KV in the storage format: the tiered systems' pinned host tier, and their
    disk pool, to which every full group is written behind."""
    return int(full_cache_kv(s, o) * stored_share(s, o))


def nothing(s: Shape, o: Options) -> int:
    return 0  # no bytes of this kind (also the default disk_bytes: a system not on disk)


def sparse_gpu_bytes(s: Shape, o: Options) -> int:
    # The pool holds every group; the first step summarizes the whole prompt of one layer at once.
    one_layer_keys = s.batch * s.context * s.config.kv_bytes_per_token_per_layer(s.dtype) // 2
    return full_cache_kv(s, o) + summary_bytes(s, o, s.context) + one_layer_keys


def ssd_host(s: Shape, o: Options) -> int:
    return int(o.ssd_host_gib * GIB)  # the arena, registered at its exact size


def tiered_gpu_bytes(s: Shape, o: Options) -> int:
    sp = o.sparse
    cache = 0 if o.cache_tokens == "auto" else o.cache_tokens  # auto: the minimum; it grows into what is free
    resident = cache + sp.sink_tokens + sp.window_tokens + budget_tokens(sp, s.context)
    return s.batch * resident * s.kv_token + summary_bytes(s, o, s.context)


def hf_gpu_bytes(s: Shape, o: Options) -> int:
    # Prefill activations of the batch (hidden states, q/k/v, the MLP's three intermediates)
    # and two layers of KV (one computing, one prefetched).
    c = s.config
    per_token = (6 * c.hidden_size + 3 * c.intermediate_size) * s.dtype.itemsize
    return s.batch * s.context * per_token + 2 * s.batch * s.context * c.kv_bytes_per_token_per_layer(s.dtype)


def hf_host_bytes(s: Shape, o: Options) -> int:
    return 2 * full_cache_kv(s, o)  # each step writes a layer's grown KV back before the old copy is freed
