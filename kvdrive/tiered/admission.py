"""Admission for the tiered cache: how many sequences the tiers hold, and what one costs on the GPU.

The KV of every sequence lives in pinned host memory (or, with a disk tier, within the
disk budget); the GPU holds, per sparse layer, each sequence's selection-cache pages,
slot tables and group summaries. A batch is admitted only as far as both hold it; a cache
that cannot fit is refused before anything is allocated, with the setting to change.
"""

from __future__ import annotations

import math

import torch

from kvdrive.cache.sparse import layer_summarizer, max_pages_for
from kvdrive.config import ModelConfig
from kvdrive.errors import CapacityError
from kvdrive.models.flops import prefill_activation_bytes
from kvdrive.storage.layout import GroupLayout
from kvdrive.tiered.config import TieredConfig
from kvdrive.tiered.host_kv import host_room

GPU_HEADROOM = 2 << 30  # GPU bytes left to activations, CUDA graphs and the allocator


def gpu_room(device: torch.device | None) -> int | None:
    """GPU memory free for the cache now (minus headroom); None off CUDA."""
    if device is None or device.type != "cuda":
        return None
    return max(torch.cuda.mem_get_info(device)[0] - GPU_HEADROOM, 0)


def check_gpu_room(nbytes: int, device: torch.device, max_seqs: int) -> None:
    """Refuse up front a cache whose GPU part does not fit, with the fix."""
    room = gpu_room(device)
    if room is not None and nbytes > room:
        raise CapacityError(
            f"the tiered cache's GPU selection caches and summaries for {max_seqs} sequences need "
            f"{nbytes / 2**30:.1f} GiB of GPU memory, {room / 2**30:.1f} GiB is free: lower "
            "cache_tokens (kvdrive generate --gpu-cache-tokens), the batch (max_batch) or the maximum "
            "length"
        )


def even_capacity(tiered: TieredConfig, max_pages: int) -> int:
    """Pages per sequence of each layer's GPU cache before any rebalance: ``cache_tokens``, at
    least one selection's ``max_pages`` (``none`` eviction: exactly one selection). ``"auto"``
    counts as that minimum here: it grows into the free GPU memory when the cache is built."""
    if tiered.eviction == "none" or tiered.cache_tokens == "auto":
        return max_pages
    return max(max_pages, tiered.cache_tokens // tiered.sparse.group_tokens)


def resolve_cache_tokens(
    config: ModelConfig,
    max_seqs: int,
    max_len: int,
    dtype: torch.dtype,
    tiered: TieredConfig,
    device: torch.device | None,
    room: int | None = None,
) -> int:
    """``cache_tokens`` as a number. ``"auto"`` on CUDA: after each sequence's minimum (one
    selection's pages, slot tables, summaries), ``AUTO_GPU_SHARE`` of the free GPU memory goes
    to cache pages, evenly per sequence and sparse layer, up to the whole context (more could
    never hit), after the room one prompt of ``max_len`` takes on the GPU while it is prefilled
    (``stage_prefill``) and the activations of a prefill forward of ``prefill_tokens``; off CUDA,
    ``AUTO_CPU_TOKENS``. ``room``: GPU bytes free for the cache, instead
    of asking the device (planning for another GPU: ``kvdrive info --gpu-gib``)."""
    from kvdrive.tiered.config import AUTO_CPU_TOKENS, AUTO_GPU_SHARE

    if tiered.cache_tokens != "auto":
        return tiered.cache_tokens
    room = gpu_room(device) if room is None else room
    if room is None:
        return AUTO_CPU_TOKENS
    if tiered.stage_prefill:  # one prompt of max_len prefills with its KV on the GPU
        room = max(0, room - prefill_stage_bytes(config, max_len, dtype))
    room = max(0, room - prefill_activation_bytes(config, dtype.itemsize, tiered.prefill_tokens))
    g = tiered.sparse.group_tokens
    n = -(-max_len // g)
    layers = sum(1 for l in config.global_layers if l not in tiered.sparse.dense_layers)
    spare = int(room * AUTO_GPU_SHARE) - max_seqs * gpu_bytes_per_seq(config, max_len, dtype, tiered)
    group_bytes = GroupLayout.from_config(config, dtype, g).group_bytes
    extra = max(0, spare) // max(1, max_seqs * layers * (group_bytes + 13))  # pages + owner/stamp/fresh
    minimum = min(n, max_pages_for(tiered.sparse.selection(), g, max_len))
    return min(n, minimum + extra) * g


def prefill_stage_bytes(config: ModelConfig, tokens: int, dtype: torch.dtype) -> int:
    """GPU bytes of one prompt's KV, every layer, while it is prefilled (``TieredPrefill``'s stage)."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize * tokens


def seqs_that_fit(
    config: ModelConfig, max_len: int, dtype: torch.dtype, tiered: TieredConfig, device: torch.device | None = None
) -> int:
    """How many sequences of ``max_len`` the host tier (or the disk budget) and, on a GPU, the
    free GPU memory can hold (admission); at least 1 (a single one that does not fit is
    refused with the fix when the cache is built)."""
    per_seq = host_bytes_per_seq(config, max_len, dtype, tiered)
    room = host_room()
    if tiered.disk:
        room = sum(p.budget_bytes for p in tiered.disk)
    n = 1 << 30 if room is None else room // per_seq
    gpu = gpu_room(device)
    if gpu is not None:
        n = min(n, gpu // max(1, gpu_bytes_per_seq(config, max_len, dtype, tiered)))
    return max(1, n)


def host_bytes_per_seq(config: ModelConfig, max_len: int, dtype: torch.dtype, tiered: TieredConfig) -> int:
    """Bytes one sequence of ``max_len`` takes in the host tier, in its storage format
    (``tiered.kv_dtype``): whole stored groups, every layer; with a disk tier, in disk slots
    (each rounded up to 4 KiB for O_DIRECT)."""
    g = tiered.sparse.group_tokens
    layout = GroupLayout.from_config(config, dtype, g, tiered.kv_dtype)
    per_group = layout.slot_bytes if tiered.disk else layout.stored_bytes
    return per_group * -(-max_len // g) * config.num_hidden_layers


def gpu_bytes_per_seq(config: ModelConfig, max_len: int, dtype: torch.dtype, tiered: TieredConfig) -> int:
    """GPU memory one sequence of ``max_len`` costs the cache (weights and activations not
    included): on every sparse layer its selection-cache pages and slot tables and the
    summaries of its groups; on every sliding-window layer its ring of recent tokens. Rebalancing moves pages between layers, never adds any."""
    g = tiered.sparse.group_tokens
    n = -(-max_len // g)
    group_bytes = GroupLayout.from_config(config, dtype, g).group_bytes
    cap = even_capacity(tiered, min(n, max_pages_for(tiered.sparse.selection(), g, max_len)))
    h, d = config.num_key_value_heads, config.head_dim
    total = sum(2 * h * min(w, max_len) * d * dtype.itemsize for w in config.sliding_windows if w is not None)  # rings
    for layer in config.global_layers:
        if layer in tiered.sparse.dense_layers:
            continue
        summ = layer_summarizer(tiered.sparse, layer, h, d, 1, "cpu")
        total += (
            cap * group_bytes
            + (n + 1) * 4
            + (cap + 1) * 13  # pages, slot table, owner/stamp/fresh
            + n * summ.bytes_per_group(dtype)
            + summ.bytes_per_sequence(torch.float32)
        )
    return total


def plan(
    config: ModelConfig,
    context: int,
    batch: int,
    dtype: torch.dtype,
    tiered: TieredConfig,
    gpu_bytes: int,
    host_bytes: int,
) -> dict:
    """Where ``batch`` sequences of ``context`` tokens can live on a GPU of ``gpu_bytes`` and a
    host of ``host_bytes`` (``kvdrive info --gpu-gib``): weights (2 bytes per parameter at
    bf16/fp16), whether all KV fits on the GPU, and for the tiered cache the sequences the
    GPU and host admit and the ``auto`` GPU-cache size at this batch. Arithmetic only."""
    weights = config.num_parameters() * dtype.itemsize
    kv = batch * config.kv_bytes_at(context, dtype)
    room = max(0, gpu_bytes - weights - GPU_HEADROOM)
    host_per_seq = host_bytes_per_seq(config, context, dtype, tiered)
    minimum = gpu_bytes_per_seq(config, context, dtype, tiered)
    out = {
        "weights_bytes": weights,
        "kv_bytes": kv,
        "gpu_room_bytes": room,
        "all_kv_on_gpu": kv <= room,
        "tiered_gpu_min_bytes_per_seq": minimum,
        "tiered_host_bytes_per_seq": host_per_seq,
        "tiered_seqs_gpu": room // max(1, minimum),
        "tiered_seqs_host": host_bytes // host_per_seq,
    }
    fits = batch <= min(out["tiered_seqs_gpu"], out["tiered_seqs_host"])
    out["tiered_fits"] = fits
    out["tiered_cache_tokens"] = (
        resolve_cache_tokens(config, batch, context, dtype, tiered, None, room) if fits else None
    )
    return out


def check_disk_tier(
    config: ModelConfig, dtype: torch.dtype, tiered: TieredConfig, prompt_lens: list[int], max_len: int, max_seqs: int
) -> None:
    """Refuse up front a request the disk tier cannot serve, naming the setting and the size
    that would work: the host arena must hold at once the groups of one whole prompt (prefill
    attends over them exactly), or of every sequence at ``max_len`` when some layers stay
    dense, and each decoding sequence's selection and open group; the disk budget must hold
    one sequence of ``max_len``. No-op without a disk tier."""
    if not tiered.disk:
        return
    g = tiered.sparse.group_tokens
    layout = GroupLayout.from_config(config, dtype, g, tiered.kv_dtype)
    longest = max_len if tiered.sparse.dense_layers else max(prompt_lens)
    pages = min(-(-max_len // g), max_pages_for(tiered.sparse.selection(), g, max_len))
    groups = max(-(-longest // g) + max_seqs - 1, max_seqs * (pages + 1))
    need = groups * layout.slot_bytes * config.num_hidden_layers
    if tiered.host_bytes < need:
        raise CapacityError(
            f"the host arena in front of the disks (--host-gib, TieredConfig.host_bytes) holds "
            f"{tiered.host_bytes / 2**30:.3g} GiB; {max_seqs} sequence(s) of up to {max_len} tokens "
            f"need {groups} groups a layer in it at once: use --host-gib {_gib_up(need)} "
            f"(host_bytes={need}) or more"
        )
    per_seq = layout.slot_bytes * -(-max_len // g) * config.num_hidden_layers
    budget = sum(p.budget_bytes for p in tiered.disk)
    if budget < per_seq:
        raise CapacityError(
            f"the disk budget (--disk-gib per --disk, PoolPath.budget_bytes) of {budget / 2**30:.3g} "
            f"GiB holds less than one sequence of {max_len} tokens: use --disk-gib "
            f"{_gib_up(per_seq / len(tiered.disk))} or more"
        )


def _gib_up(nbytes: float) -> str:
    """``nbytes`` in GiB, rounded up to 2 significant digits (a value that works)."""
    gib = nbytes / 2**30
    digits = max(0, 1 - math.floor(math.log10(gib))) if gib > 0 else 0
    step = 10.0**-digits
    return f"{math.ceil(gib / step) * step:.{digits}f}"
